"""Infrastructure code for gpufleet's stacks: what talks to Proxmox and Azure."""
