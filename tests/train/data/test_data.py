"""HDF5 patch datasets: round trip, validation, many files as one, torch Dataset."""
from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse
import torch

from brst.handlers.errors import BrstError
from brst.train.atomic import atomic_path
from brst.train.data import DatasetWriter, PatchDataset, open_dataset
from brst.train.data.readers.base import Section
from brst.train.data.slide_stain import section_stain

PATCH_PX = 8


class NoImage:
    path, width, height = "none", 100, 100


def make_section(name: str, patient: str, n: int, genes: list[str], seed: int) -> tuple[Section, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = scipy.sparse.csr_matrix(rng.poisson(3.0, (n, len(genes))).astype(np.int32))
    section = Section(
        section=name, patient=patient, source_format="test", spot_id=np.array([f"{i}x{seed}" for i in range(n)], object),
        pixel_x=rng.uniform(10, 90, n), pixel_y=rng.uniform(10, 90, n), counts=counts, genes=np.array(genes, object),
        um_per_px=1.0, spot_diameter_um=100.0, image=NoImage(), array_x=np.arange(n, dtype=float), array_y=None,
    )
    return section, rng.integers(0, 256, (n, PATCH_PX, PATCH_PX, 3), dtype=np.uint8)


def write_file(path: Path, parts: list[tuple[Section, np.ndarray]], genes: list[str], panel: list[str],
               um_per_px: float = 0.5, finish: bool = True) -> Path:
    attrs = {"source_format": "test", "reader_version": "1", "um_per_px": um_per_px, "patch_px": PATCH_PX,
             "patch_um": PATCH_PX * um_per_px, "spot_diameter_um": 100.0, "filters": {"min_counts": 0}}
    n = sum(section.n_spots for section, _ in parts)
    with atomic_path(path) as tmp, DatasetWriter(tmp, n, genes, panel, attrs) as writer:
        for section, patches in parts:
            column = {g: i for i, g in enumerate(section.genes)}
            writer.append(section, patches, section.counts[:, [column[g] for g in genes]], section.library_size,
                          section_stain(patches))
        if finish:
            writer.finish()
    return path


@pytest.fixture()
def two_files(tmp_path):
    genes_a, genes_b = ["g1", "g2", "g3", "g4"], ["g4", "g2", "g5", "g1"]
    a = [make_section("S1", "P1", 5, genes_a, 1), make_section("S2", "P2", 3, genes_a, 2)]
    b = [make_section("S3", "P3", 4, genes_b, 3)]
    return (write_file(tmp_path / "a.h5", a, genes_a, ["g2", "g1"]),
            write_file(tmp_path / "b.h5", b, genes_b, ["g2", "g4"]), a, b)


def test_round_trip_one_file(tmp_path):
    genes = ["g1", "g2", "g3"]
    parts = [make_section("S1", "P1", 6, genes, 7), make_section("S2", "P1", 4, genes, 8)]
    index = open_dataset(write_file(tmp_path / "d.h5", parts, genes, ["g3"]))
    assert len(index) == 10 and list(index.genes) == genes and list(index.panel) == ["g3"]
    assert list(index.aux_genes) == ["g1", "g2"]
    np.testing.assert_array_equal(index.patches(np.arange(10)), np.concatenate([p for _, p in parts]))
    np.testing.assert_array_equal(index.counts(np.arange(10)), scipy.sparse.vstack([s.counts for s, _ in parts]).toarray())
    np.testing.assert_array_equal(index.spots["spot_id"], np.concatenate([s.spot_id for s, _ in parts]))
    np.testing.assert_allclose(index.spots["pixel_x"], np.concatenate([s.pixel_x for s, _ in parts]))
    np.testing.assert_array_equal(index.spots["library_size"], np.concatenate([s.library_size for s, _ in parts]))
    assert np.isnan(index.spots["array_y"]).all() and index.spots["array_x"][6] == 0
    assert index.attrs["schema_version"] == 2 and index.attrs["complete"]
    with h5py.File(index.files[0]) as handle:
        assert handle["patches"].chunks == (1, PATCH_PX, PATCH_PX, 3) and handle["counts"].compression == "gzip"


def test_unordered_and_repeated_indices(two_files):
    path_a, path_b, a, b = two_files
    index = open_dataset([path_a, path_b])
    order = np.array([9, 0, 9, 3, 11, 0])
    every = index.patches(np.arange(len(index)))
    np.testing.assert_array_equal(index.patches(order), every[order])
    np.testing.assert_array_equal(index.counts(order), index.counts(np.arange(len(index)))[order])


def test_many_files_intersect_genes(two_files):
    path_a, path_b, a, b = two_files
    index = open_dataset([path_a, path_b])
    assert list(index.genes) == ["g1", "g2", "g4"]
    assert list(index.panel) == ["g2", "g1"]  # panels differ: the first file's, within common genes
    assert len(index) == 12 and list(index.spots["file_index"]) == [0] * 8 + [1] * 4
    section_b = b[0][0]
    expected = section_b.counts.toarray()[:, [3, 1, 0]]  # g1, g2, g4 in b's column order g4 g2 g5 g1
    np.testing.assert_array_equal(index.counts(np.arange(8, 12)), expected)
    np.testing.assert_array_equal(index.counts([8], genes=["g4"]), expected[:1, [2]])
    with pytest.raises(BrstError, match="g5"):
        index.counts([0], genes=["g5"])


def test_folder_opens_as_one_dataset(two_files):
    path_a, _, _, _ = two_files
    assert len(open_dataset(path_a.parent)) == 12


def test_incomplete_file_is_rejected(tmp_path):
    genes = ["g1"]
    path = write_file(tmp_path / "x.h5", [make_section("S", "P", 2, genes, 1)], genes, genes, finish=False)
    with pytest.raises(BrstError, match="incomplete"):
        open_dataset(path)


def test_other_schema_and_non_hdf5_are_rejected(two_files, tmp_path):
    path_a = two_files[0]
    with h5py.File(path_a, "a") as handle:
        handle.attrs["schema_version"] = 99
    with pytest.raises(BrstError, match="schema_version 99"):
        open_dataset(path_a)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(BrstError, match="not a readable HDF5"):
        open_dataset(junk)
    with pytest.raises(BrstError, match="not found"):
        open_dataset(tmp_path / "missing.h5")


def test_geometry_must_agree(tmp_path):
    genes = ["g1"]
    first = write_file(tmp_path / "a.h5", [make_section("S", "P", 2, genes, 1)], genes, genes, um_per_px=0.5)
    second = write_file(tmp_path / "b.h5", [make_section("T", "P", 2, genes, 2)], genes, genes, um_per_px=1.0)
    with pytest.raises(BrstError, match="um_per_px"):
        open_dataset([first, second])


def test_split(two_files):
    index = open_dataset(list(two_files[:2]))
    train, test = index.split("patient", ["P2"])
    assert sorted(index.spots["patient"][test]) == ["P2"] * 3 and "P2" not in set(index.spots["patient"][train])
    assert len(train) + len(test) == len(index)
    train, test = index.split("section", ["S1", "S3"])
    assert len(test) == 9
    with pytest.raises(BrstError, match="P9"):
        index.split("patient", ["P9"])


def test_patch_dataset_items_and_workers(two_files):
    index = open_dataset(list(two_files[:2]))
    train, _ = index.split("patient", ["P1"])
    dataset = PatchDataset(index, train)
    item = dataset[0]
    assert item["patch"].dtype == torch.uint8 and item["patch"].shape == (PATCH_PX, PATCH_PX, 3)
    assert item["counts"].dtype == torch.float32 and item["counts"].shape == (3,)
    assert item["library_size"].dtype == torch.float64 and item["index"] == train[0]
    assert pickle.loads(pickle.dumps(index))._handles == {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batches = list(loader)
    order = torch.cat([b["index"] for b in batches]).numpy()
    np.testing.assert_array_equal(order, train)
    np.testing.assert_array_equal(torch.cat([b["patch"] for b in batches]).numpy(), index.patches(train))
    np.testing.assert_array_equal(torch.cat([b["counts"] for b in batches]).numpy(), index.counts(train))
    by_rows = PatchDataset(index, train, counts_in_memory_mb=0)  # too big for memory: read row by row
    assert by_rows.counts is None
    for k in (0, len(train) - 1):
        np.testing.assert_array_equal(by_rows[k]["counts"].numpy(), dataset[k]["counts"].numpy())


def test_real_her2st_dataset(her2st_h5):
    index = open_dataset(her2st_h5)
    assert index.attrs["source_format"] == "her2st" and index.patch_px == 56
    train, test = index.split("section", ["C2"])
    dataset = PatchDataset(index, test)
    item = dataset[len(dataset) - 1]
    assert index.spots["section"][item["index"]] == "C2"
    assert item["counts"].sum() > 0 and float(item["library_size"]) >= 1000
