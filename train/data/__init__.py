"""HDF5 patch datasets: the schema, the writer, and reading for training.

``open_dataset(paths) -> PatchIndex`` and ``PatchDataset(index, idx)``; see docs/CONTRACTS.md.
``PatchDataset`` (which needs torch) is imported on first use, so ``prepare`` starts fast.
"""
from .index import PatchIndex, open_dataset
from .schema import SCHEMA_VERSION
from .writer import DatasetWriter

__all__ = ["SCHEMA_VERSION", "DatasetWriter", "PatchDataset", "PatchIndex", "open_dataset"]


def __getattr__(name: str):
    if name == "PatchDataset":
        from .dataset import PatchDataset

        return PatchDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
