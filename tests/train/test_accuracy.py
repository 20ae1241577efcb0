"""Per-gene accuracy (brst.train.accuracy) against scipy/numpy references, and the paper's summaries."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from brst.train import accuracy


def _pair(seed: int, n: int = 50, g: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.gamma(2.0, 1.0, size=(n, g))
    pred = 0.6 * true + rng.normal(0.0, 1.0, size=(n, g)) * np.linspace(0.1, 3.0, g)
    return pred, true


def test_pearson_matches_scipy_per_column():
    pred, true = _pair(0)
    ours = accuracy.pearson_r(pred, true)
    reference = [stats.pearsonr(pred[:, j], true[:, j]).statistic for j in range(true.shape[1])]
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


def test_pearson_matches_corrcoef_on_float32_input():
    pred, true = _pair(1, n=300, g=3)
    ours = accuracy.pearson_r(pred.astype(np.float32), true.astype(np.float32))
    reference = [np.corrcoef(pred[:, j].astype(np.float32), true[:, j].astype(np.float32))[0, 1] for j in range(3)]
    np.testing.assert_allclose(ours, reference, rtol=1e-6)


def test_constant_column_has_no_r_and_is_not_positive():
    pred, true = _pair(2, g=3)
    pred[:, 1] = 4.0
    r = accuracy.pearson_r(pred, true)
    assert np.isnan(r[1]) and not np.isnan(r[[0, 2]]).any()
    summary = accuracy.summarize(accuracy.gene_metrics(pred, true), ["a", "b", "c"])
    assert summary["n_positive"] == int(np.sum(r[[0, 2]] > 0))
    assert summary["mean_r"] == pytest.approx(np.mean(r[[0, 2]]))
    assert "b" not in [entry["gene"] for entry in summary["best_genes"]]


@pytest.mark.parametrize("n", [10, 50, 182, 1000])
def test_a_repeated_value_is_constant_not_a_tiny_r(n):
    """0.7 repeated centres to rounding noise (~1e-17), which must not give r = ±1e-17 counted as r > 0."""
    pred, true = _pair(5, n=n, g=3)
    true[:, 1] = 0.7
    pred[:, 2] = 0.7
    r = accuracy.pearson_r(pred, true)
    assert np.isnan(r[1]) and np.isnan(r[2]) and not np.isnan(r[0])
    assert accuracy.summarize(accuracy.gene_metrics(pred, true), ["a", "b", "c"])["n_positive"] == int(r[0] > 0)
    scaled = accuracy.pearson_r(pred * 1e-9, true * 1e6)  # the tolerance follows each column's scale
    assert np.isnan(scaled[1:]).all() and scaled[0] == pytest.approx(r[0])
    tiny_but_varying = true.copy()
    tiny_but_varying[:, 1] = 0.7 + 1e-9 * pred[:, 1]
    assert accuracy.pearson_r(pred, tiny_but_varying)[1] == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(0.01, 100.0), shift=st.floats(-50.0, 50.0), seed=st.integers(0, 10_000))
def test_pearson_invariant_to_positive_affine_and_flips_with_sign(scale, shift, seed):
    pred, true = _pair(seed, n=20, g=4)
    r = accuracy.pearson_r(pred, true)
    np.testing.assert_allclose(accuracy.pearson_r(scale * pred + shift, true), r, atol=1e-9)
    np.testing.assert_allclose(accuracy.pearson_r(-scale * pred + shift, true), -r, atol=1e-9)


def test_mae_and_rmse_match_per_column_loops():
    pred, true = _pair(3)
    for j in range(true.shape[1]):
        diff = pred[:, j] - true[:, j]
        assert accuracy.mae(pred, true)[j] == pytest.approx(np.mean(np.abs(diff)))
        assert accuracy.rmse(pred, true)[j] == pytest.approx(np.sqrt(np.mean(diff**2)))


def test_summary_counts_and_averages():
    pred, true = _pair(4, n=200, g=7)
    per_gene = accuracy.gene_metrics(pred, true)
    genes = [f"g{j}" for j in range(7)]
    summary = accuracy.summarize(per_gene, genes, top=3)
    r = per_gene["r"]
    assert summary["n_genes"] == 7
    assert summary["n_positive"] == int(np.sum(r > 0))
    assert summary["n_good"] == int(np.sum(r > 0.5))
    assert summary["median_r"] == pytest.approx(np.median(r))
    assert summary["amae"] == pytest.approx(per_gene["mae"].mean())
    assert summary["armse"] == pytest.approx(per_gene["rmse"].mean())
    assert [entry["gene"] for entry in summary["best_genes"]] == [genes[j] for j in np.argsort(-r)[:3]]


def test_fold_summary_uses_median_across_folds():
    r_folds = np.array([[0.6, 0.1, -0.2], [0.7, 0.9, -0.1], [0.4, 0.2, np.nan]])
    summary = accuracy.summarize_folds(r_folds, ["a", "b", "c"])
    np.testing.assert_allclose(summary["median_r_per_gene"], [0.6, 0.2, -0.15])
    assert summary["n_median_good"] == 1 and summary["n_median_positive"] == 2
    assert summary["fold_mean_n_positive"] == pytest.approx((2 + 2 + 2) / 3)
    assert summary["best_genes"][0] == {"gene": "a", "r": pytest.approx(0.6)}


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        accuracy.pearson_r(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2 spots"):
        accuracy.mae(np.zeros((1, 2)), np.zeros((1, 2)))
