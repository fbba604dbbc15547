"""Prefect flows: one module per stage, plus the demo pipeline."""
