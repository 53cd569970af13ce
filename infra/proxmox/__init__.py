"""Proxmox VE: a verified API connection (`client`) and the checks before provisioning
(`preflight`)."""
