"""Training a model on lake data: deterministic, checkpointed as Hugging Face directories, resumable.

Attribution needs a model that has learned something from known samples, and a ground
truth needs many retrainings that differ only in their data.  So a training run here is
a pure function of its `TrainSpec`:

- the data order is drawn from the seed alone (epoch ``e`` is the permutation
  ``numpy.random.default_rng([seed, e])`` of the kept samples, cut into batches), so the
  samples of any step are known without replaying the run, and are recorded;
- the learning rate is a function of the step (no scheduler state);
- the loss is the extraction's (``tasks/common/loss.py``): the mean over the batch of each
  sample's mean token loss, for the same paradigm.

A checkpoint is a Hugging Face directory (config, ``model.safetensors``, tokenizer,
generation config) plus ``gradlake_train.json`` (lineage: base model and commit, dataset
versions, hyperparameters, the sample ids trained on up to that step in order, gradlake
version) and ``trainer_state/`` (AdamW moments and RNG state as safetensors, scalars as
JSON: no pickles).  It becomes visible only when whole: a local checkpoint is written
beside its final name (a hidden ``.partial-<random>`` directory of its own, which the watcher
ignores) and renamed into place; on S3 every other file is uploaded before the weights, whose object
appears only when its upload completes, so the watcher's test (config plus whole weight
files) holds exactly when the checkpoint is complete.

A run killed at any point resumes from its last complete checkpoint (same weights,
optimizer moments, step and RNG state), and ends with the same weights, bit for bit on
CPU, as a run that was never interrupted.  One run writes into a prefix at a time: it holds
the prefix's claim, keyed by its fingerprint (``claim.py``), and reads the fingerprint of a
checkpoint already at a target before publishing over it, so a prefix never mixes two runs.
"""
