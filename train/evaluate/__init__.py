"""``brst-train evaluate``: a checkpoint or a cross-validation scored per gene beside the two baselines."""
