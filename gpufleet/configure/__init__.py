"""Host configuration: Ansible runs driven from Python (inventory, ansible-runner, progress)."""
