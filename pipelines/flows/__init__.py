"""Prefect flows: lock, update, evaluate and the scheduled retrain (see prefect.yaml)."""
