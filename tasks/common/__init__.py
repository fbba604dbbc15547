"""What every stage shares: model loading, the loss convention, lineage and version, progress, report rendering,
retry rules and lake verification.
"""
