"""``brst-train fit``: options and recipes -> data, targets, stain, model -> epochs -> a run directory."""
