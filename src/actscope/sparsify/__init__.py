"""Training-free activation sparsity: calibrate thresholds, apply them, measure the speed-up."""
