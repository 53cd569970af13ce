"""Azure GPU VMs with pulumi-azure-native: the stack's network and one component per host."""
