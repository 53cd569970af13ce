"""The hosts layer (placeholder until written)."""
