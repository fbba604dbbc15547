"""Stage 4, select vs project: which vectors (a tensor, a layer group, the full gradient, a projection) find a
sample's original from its paraphrase or generated version, against BM25 and a dense text baseline.
"""
