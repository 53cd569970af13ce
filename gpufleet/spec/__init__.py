"""The typed specs (ModelSpec, StackSpec), their cross-field checks and their loading."""
