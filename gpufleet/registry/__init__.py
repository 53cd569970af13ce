"""The MLflow model registry side of gpufleet: resolve, download, seed demo models, lineage."""
