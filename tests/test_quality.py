"""Answer quality per checkpoint: ROUGE-L and BLEU against direct computation, the LLM judge over HTTP."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from gradlake.tasks.data.quality import JudgeSpec, judge_answers, overlap_scores, parse_grade


def lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_and_bleu_against_direct_computation():
    references = ["the cat sat on the mat", "a model learns from its data", "gradients find training samples"]
    answers = ["the cat lay on a mat", "a model learns from its data", "nothing in common here"]
    rouge, bleu, corpus = overlap_scores(references, answers)
    for reference, answer, got in zip(references, answers, rouge):
        r, a = reference.split(), answer.split()
        common = lcs(r, a)
        expected = 0.0 if common == 0 else 2 * (common / len(a)) * (common / len(r)) / (common / len(a) + common / len(r))
        assert got == pytest.approx(expected)
    assert rouge[0] == pytest.approx(4 / 6)
    assert bleu[1] == pytest.approx(100.0) and bleu[2] < 5 and 0 < bleu[0] < 100
    # Corpus BLEU from its definition: the brevity penalty times the geometric mean of clipped n-gram precisions.
    import sacrebleu

    stats = sacrebleu.corpus_bleu(answers, [references])
    precisions = [c / t for c, t in zip(stats.counts, stats.totals)]
    brevity = min(1.0, math.exp(1 - stats.ref_len / stats.sys_len))
    assert corpus == pytest.approx(100 * brevity * math.exp(sum(math.log(p) for p in precisions) / 4))


@pytest.mark.parametrize("reply, grade", [("7", 7.0), ("Score: 10/10", 10.0), ("0", 0.0), ("great answer", None)])
def test_parse_grade(reply, grade):
    got = parse_grade(reply)
    assert (math.isnan(got) if grade is None else got == grade)


def test_judge_grades_over_http(openai_server):
    spec = JudgeSpec(base_url=openai_server.base_url)
    grades = judge_answers(spec, ["What sits on the mat?"] * 3,
                           ["the cat sits on the mat"] * 3,
                           ["the cat sits on the mat", "the dog sits on the mat", "unrelated words only"])
    assert grades == [10.0, 7.0, 0.0]  # the server's word-overlap grade: 5/5, 4/6 -> 7, 0
    assert all(s.system.startswith("You grade answers") for s in openai_server.seen)
    assert all(s.status == 200 for s in openai_server.seen) and len(openai_server.seen) == 3


def test_judge_without_a_key_is_one_clear_error(monkeypatch, openai_server):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match=r"\$OPENAI_API_KEY is unset"):
        judge_answers(JudgeSpec(base_url=openai_server.base_url), ["q"], ["r"], ["a"])
    assert openai_server.seen == []
