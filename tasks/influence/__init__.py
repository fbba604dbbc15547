"""Influence functions with Kronfluence, under gradlake's loss convention, into the lake.

Kronfluence (Grosse et al., 2023; Bae et al., 2024) approximates the inverse Hessian
(Gauss-Newton) of the training loss per tracked ``nn.Linear`` module with one of four
strategies: ``identity`` (no preconditioning: plain gradient dot products), ``diagonal``,
``kfac`` (Kronecker factors of activation and output-gradient covariances) and ``ekfac``
(K-FAC's eigenbasis with corrected eigenvalues).  The pairwise score of query q and
training sample i is ``grad f_q . (G + damping I)^-1 . grad L_i``, positive when training
on i lowers the query's loss.  GPT-2's ``Conv1D`` layers (y = x W + b, W stored transposed) are
replaced by the equal ``nn.Linear`` (weight W^T) before Kronfluence sees the model, so they are
tracked too; a weight gradient is then the transpose of the Conv1D one, and dot products are unchanged.

Here both gradients are of the extraction's loss (``tasks/common/loss.py``): each sample's mean
token cross-entropy over its label positions (``sft``: assistant tokens; ``pre``: all), so
``identity`` scores equal dot products of the per-sample gradients the lake stores.  The
covariances are fitted with the true Fisher by default (labels sampled from the model at
the label positions), or with the empirical Fisher (the data's own labels) on request.

Nothing stays in Kronfluence's own output folder: its factors (safetensors, written by
Kronfluence) are copied into the lake with their lineage, and its scores are computed a
block of (queries x training samples) at a time and written into a `lake.scores`
group, so a matrix larger than memory is fine and a killed run resumes at its first
missing block; factors found in the lake are checked against the digests their record holds
(a file changed, removed or added is one error naming it, before anything is written) and not fitted again.

```
<lake>/influence/<model>/<checkpoint>/<dataset>/<paradigm>-<strategy>-<key>/factors/*.safetensors   factors.json (lineage, each file's digest), manifest.json (last)
<lake>/attribution/<model>/<checkpoint>/<dataset>/<query dataset>.<query variant>/<method>/              the scores (lake/scores.py)
```
"""
