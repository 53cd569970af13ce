"""Pulumi resources for the lifecycle steps after a host's VM: configuration, deployment, gate.

Each is a dynamic resource whose provider calls the same function the CLI calls
(gpufleet/lifecycle/); see providers.py and host_lifecycle.py.
"""
