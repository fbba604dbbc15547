"""Stage 1, datasets: sources normalised to chats, paraphrases from an OpenAI-compatible API, the model's own
answers, the bundled probe set, and the quality of a checkpoint's answers.
"""
