"""One attribution benchmark: every method's scores against retraining (LDS, counterfactual removal) and retrieval.

The methods are score groups in the lake (``lake/scores.py``): Kronfluence influence
(``tasks/influence/compute.py``) and the baselines made from what the lake already holds for the
attributed model (``tasks/attribution/baselines.py``).

The queries (``AttributionSpec.queries``) are, by default, **held-out** samples of the
training dataset that the attributed run never trained on: the setting of the LDS
literature, where no training sample is a copy of a query.  They can also be paraphrases
or the model's own answers of training samples (fact tracing: each such query has a
*source* training sample), or any dataset and variant in the lake.  Where queries have a
source, the table adds the source oracle and the LDS beyond the source
(``tasks/attribution/lds.py``), so that the part of a method's LDS that is duplicate
retrieval shows.

The ground truth retrains the attributed model's own training run (`TrainSpec`) with
only its data changed: M seeded random subsets for LDS (each with ``retrain_seeds``
data orders, losses averaged), and per query its top-k training samples removed (for the
methods asked) or k random ones (several draws) for counterfactual removal.  Each
retraining is an ordinary ``train-model`` run with its own checkpoint prefix, so a
finished one is found and skipped and a killed one resumes.

Every interval is the crossed-design interval of ``tasks/attribution/lds.py`` (queries and
subsets both vary); adjacent methods in the table are marked separated only when the
paired interval of their difference excludes 0.  The ``grad-cosine:best-tensor`` row is
cross-fitted: the queries are split into folds, and each fold is scored with the single
tensor whose LDS was best on the other folds, so no query is scored by a choice made on it.
"""
