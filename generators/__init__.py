"""Specs in, artifacts out: Triton configs, model repositories, schemas. Never talks to a cloud."""
