"""brst.handlers: what runs inside TorchServe, and the preprocessing ops training shares."""
