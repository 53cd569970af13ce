"""Checks that run generated artefacts against the real tools that consume them."""
