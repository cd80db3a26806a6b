"""Prefect flows: thin wrappers over chips_core's stage functions (one flow per stage + the pipeline)."""
