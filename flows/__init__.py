"""Prefect flows that run the repository's DVC pipeline (see `flows.pipeline`)."""
