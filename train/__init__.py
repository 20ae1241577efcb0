"""brst.train: the training application, one folder per stage a user runs.

- :mod:`brst.train.data`: the HDF5 patch-dataset contract, format readers, ``fetch``,
  ``prepare``, ``inspect``;
- :mod:`brst.train.fit`: ``fit`` (options, recipes, the loop, checkpoints, DDP);
- :mod:`brst.train.evaluate`: ``evaluate`` (per-gene metrics, baselines, cross-validation, reports);
- :mod:`brst.train.serve`: ``archive``, ``serve``, ``predict`` (the .mar builder, the TorchServe
  process, HTTP/gRPC clients);
- :mod:`brst.train.slide`: ``predict-slide`` (whole-slide expression maps);
- :mod:`brst.train.cli`: the ``brst-train`` command line, one module per stage.

Everything here may import :mod:`brst.handlers` (the runtime shared with the served model);
nothing in :mod:`brst.handlers` imports this package (docs/ARCHITECTURE.md).
"""
