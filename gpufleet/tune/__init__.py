"""`gpufleet tune`: search a model's batching and instance settings on a stack's real Triton.

space.py (the candidates), trial.py (one candidate loaded and measured), objective.py (what
"best" means, noise included), search.py (quick and exhaustive), report.py (table, PNG, HTML),
write_back.py (the chosen settings written into the spec file, comments kept).
"""
