"""Drift checks of a whole environment: files, Triton, hosts, containers and infrastructure."""
