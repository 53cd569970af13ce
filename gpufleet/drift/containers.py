"""The containers layer (placeholder until written)."""
