"""Model tracing: is a candidate model derived from a base?  Permutation, alignment and statistics.

A decoder's function is unchanged when the hidden units of an MLP are permuted (the rows
of its gate and up projections and the columns of its down projection together), or when
the dimensions of the residual stream are permuted (the columns of the embeddings, of every
projection reading the stream and of the output layer, the rows of every projection writing
to it, and the weights of the norms acting on it).  A weight-by-weight comparison of two
models is fooled by either; aligning the candidate back to the base undoes them.

Everything here works on the architecture's real modules (OLMo and OLMo-2 decoders:
``model.layers[i].self_attn`` / ``.mlp``) through one map, :func:`permutation_axes`, from
each parameter to the axes a permutation acts on; permuting, aligning and comparing all
read it, so they cannot disagree.  A permutation ``p`` of an axis means ``new[i] = old[p[i]]``.

Statistics (each against the base, on the candidate as given or aligned):

- ``cos``: the mean cosine similarity of the weight matrices;
- ``emb``: the mean cosine similarity of the input embeddings, token by token;
- ``matching`` (aligned only): the share of MLP units on which the gate and up matchings agree;
- ``mode``: the loss along the straight line between the two models' weights, and its
  barrier (the largest excess of that loss over the line between the end points' losses).

Their p-values come from permutation tests: under the null hypothesis that the candidate was
trained independently of the base, its hidden units and residual dimensions are exchangeable
(training is equivariant to permuting them), so the statistic of randomly permuted copies of
the candidate is distributed as the observed one.  ``p = (1 + #{null >= observed}) / (1 + n)``
for ``n`` permutations (``<=`` for the barrier, where small means related).  An aligned
statistic is maximised over permutations by the alignment itself, so this null does not hold
for it; its p-value is that of the matching test (:func:`matching_test`, after Zhu et al. 2025):
the matchings of each MLP's units found independently from its gate and from its up projection
agree for a derived model and not for an independent one.  The statistic counts the units on
which they agree, so no relabelling of the candidate's units changes it (a statistic reading the
matched indices as numbers, such as their rank correlation, would); its null shuffles the
candidate's up units against its gate units; the layers' p-values are combined with Fisher's
method.  Unaligned statistics are meant to change under a relabelling: the control
(``permute``) shows that they are fooled by one.
"""
