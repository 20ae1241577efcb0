"""brst.train: readers, HDF5 patch datasets, models, fitting, evaluation, archiving, CLI."""
