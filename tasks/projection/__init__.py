"""Random projections (TRAK's projectors and gradlake's block, sparse and Kronecker ones): the spec, the projectors,
and projecting gradient groups already in the lake.  Extraction applies the same projectors on the fly.
"""
