"""gpufleet: typed specs, generators and gates for GPU model serving with Triton."""
