"""Macenko stain normalisation, batched: every patch unmixed and remixed at once, on any device.

Macenko et al., "A method for normalizing histology slides for quantitative analysis",
ISBI 2009; the reference code is ``HEnorm_python`` (ported by torchstain). Per patch:

1. optical density ``OD = -log((255 x + 1) / io)``; tissue = OD >= ``beta`` in every channel;
2. the plane of the two largest eigenvectors of the tissue OD covariance (``eigh`` on
   ``(B, 3, 3)``); the first one's sign is fixed to point into positive OD;
3. the angles of the tissue pixels in that plane; the ``alpha`` and ``100 - alpha``
   percentiles give the haematoxylin and eosin OD vectors (haematoxylin: larger red OD);
4. concentrations by least squares, their 99th percentiles ``max_concentration``;
5. the output remixes the concentrations, scaled to the reference's 99th percentiles,
   with the reference stain matrix: ``out = io exp(-S_ref diag(c_ref / c) S^+ OD) / 255``.

Steps 1-4 use a regular sub-grid of about ``max_sample_px`` pixels per patch (percentiles
of a few thousand pixels are as good as of 50 000); step 5 is a per-patch 3x3 matrix applied
to every pixel in log space (one ``baddbmm`` and one ``exp``), which makes it fast. For uint8
batches on the CPU it is one fused C loop (:mod:`~brst.handlers.stain.fused`); otherwise eager
torch ops, on the CPU group by group of patches (:func:`~brst.handlers.stain.pixels.patch_chunks`)
into one preallocated output.

Patches with too little tissue (``min_tissue`` of the sampled pixels), a degenerate stain
matrix or near-zero concentrations pass through unchanged and are flagged ``ok = False``.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..tissue import enough_tissue, stain_tissue_mask
from .base import StainNormalizer, reference_tensor
from .fused import fused_remix, fused_remix_applies
from .pixels import (
    check_image,
    log_intensity,
    masked_quantile,
    pass_through,
    patch_chunks,
    sampled_optical_density,
)

#: Macenko's reference (from the original code, also torchstain's default): columns H, E
DEFAULT_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
DEFAULT_MAX_CONCENTRATION = (1.9705, 1.0308)
#: below this 99th-percentile concentration (OD units) a stain is taken as absent
MIN_CONCENTRATION = 1e-2
#: below this determinant of S^T S the two stain vectors are taken as parallel
MIN_GRAM_DET = 1e-4


class MacenkoReference(NamedTuple):
    """A Macenko reference: ``stain_matrix`` ``(3, 2)`` (unit OD vectors H, E as columns)
    and ``max_concentration`` ``(2,)`` (99th percentiles of the H and E concentrations)."""

    stain_matrix: torch.Tensor
    max_concentration: torch.Tensor


def _principal_plane(od: torch.Tensor, tissue: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """The two largest eigenvectors of the tissue OD covariance (a fixed plane for patches not ok).

    Shape: ``(B, 3, N)``, ``(B, N)``, ``(B,)`` -> ``(B, 3, 2)``.
    """
    weighted = od * tissue.to(od.dtype).unsqueeze(1)
    count = tissue.sum(dim=-1).to(od.dtype).clamp(min=2).view(-1, 1, 1)
    mean = weighted.sum(dim=-1, keepdim=True) / count
    # sum (od - mean)(od - mean)^T over tissue = sum od od^T - count mean mean^T: one pass less
    cov = (weighted @ od.transpose(1, 2) - count * mean @ mean.transpose(1, 2)) / (count - 1)
    distinct = torch.diag_embed(torch.arange(1.0, 4.0, dtype=od.dtype, device=od.device))  # eigh stays finite
    cov = torch.where(ok.view(-1, 1, 1), cov, distinct)
    plane = _top_eigenvectors(cov)
    sign = torch.where(plane[:, :, 0].sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(od.dtype)
    return torch.cat([plane[..., :1] * sign.unsqueeze(-1), plane[..., 1:]], dim=-1)


def _top_eigenvectors(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the second largest and the largest eigenvalue (eigh's order, signs arbitrary):
    LAPACK's ``eigh`` on the CPU; elsewhere the closed form (:func:`symmetric3_top_eigenvectors`),
    because ``eigh`` on a GPU reads its error flags back to the host on every call.

    Shape: ``(B, 3, 3)`` symmetric -> ``(B, 3, 2)``.
    """
    if cov.device.type == "cpu":
        return torch.linalg.eigh(cov).eigenvectors[..., 1:]
    return symmetric3_top_eigenvectors(cov)


def _null_vector(m: torch.Tensor) -> torch.Tensor:
    """A unit vector ``v`` with ``m v ~ 0`` for rank-2 ``m``: the longest cross product of two rows.

    Shape: ``(B, 3, 3)`` -> ``(B, 3)``.
    """
    rows = m.unbind(dim=1)
    crosses = torch.stack([torch.linalg.cross(rows[i], rows[j]) for i, j in ((0, 1), (0, 2), (1, 2))], dim=1)
    norms = crosses.norm(dim=-1)
    best = norms.argmax(dim=1, keepdim=True)
    vector = crosses.gather(1, best.unsqueeze(-1).expand(-1, 1, 3)).squeeze(1)
    return vector / norms.gather(1, best).clamp_min(1e-300)


def symmetric3_top_eigenvectors(cov: torch.Tensor) -> torch.Tensor:
    """:func:`_top_eigenvectors` in closed form, in float64, with no host sync: the eigenvalues
    by the trigonometric solution of the characteristic cubic (Smith 1961), the largest and
    smallest eigenvectors as null vectors of ``cov - lambda I``, the middle one their cross product.

    Shape: ``(B, 3, 3)`` symmetric -> ``(B, 3, 2)``, ``cov``'s dtype.
    """
    a = cov.double()
    q = a.diagonal(dim1=-2, dim2=-1).mean(dim=-1).view(-1, 1, 1)
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    centred = a - q * eye
    p = (centred.square().sum(dim=(-2, -1)) / 6.0).sqrt().clamp_min(1e-150).view(-1, 1, 1)
    rows = (centred / p).unbind(dim=1)
    half_det = (rows[0] * torch.linalg.cross(rows[1], rows[2])).sum(dim=-1) / 2.0  # det(centred / p) / 2
    phi = half_det.clamp(-1.0, 1.0).acos().view(-1, 1, 1) / 3.0
    largest = _null_vector(a - (q + 2.0 * p * phi.cos()) * eye)
    smallest = _null_vector(a - (q + 2.0 * p * (phi + 2.0 * math.pi / 3.0).cos()) * eye)
    middle = torch.linalg.cross(smallest, largest)
    return torch.stack([middle, largest], dim=-1).to(cov.dtype)


def _extreme_stains(od: torch.Tensor, tissue: torch.Tensor, plane: torch.Tensor, alpha: float) -> torch.Tensor:
    """Stain vectors at the ``alpha`` / ``100 - alpha`` angle percentiles, haematoxylin first.

    Shape: ``(B, 3, N)``, ``(B, N)``, ``(B, 3, 2)`` -> ``(B, 3, 2)``.
    """
    projected = plane.transpose(1, 2) @ od
    angle = torch.atan2(projected[:, 1], projected[:, 0])
    vectors = []
    for q in (alpha / 100.0, 1.0 - alpha / 100.0):
        phi = masked_quantile(angle, q, tissue)
        vectors.append((plane @ torch.stack([phi.cos(), phi.sin()], dim=-1).unsqueeze(-1)).squeeze(-1))
    v_min, v_max = vectors
    h_first = (v_min[:, 0] > v_max[:, 0]).unsqueeze(-1)
    return torch.stack([torch.where(h_first, v_min, v_max), torch.where(h_first, v_max, v_min)], dim=-1)


def _unmixing(stains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares unmixing ``(S^T S)^-1 S^T`` and whether ``S`` is well conditioned.

    Shape: ``(B, 3, 2)`` -> ``(B, 2, 3)``, ``(B,)`` bool.
    """
    gram = stains.transpose(1, 2) @ stains
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    ok = det > MIN_GRAM_DET
    safe_det = torch.where(ok, det, torch.ones_like(det))
    adjugate = torch.stack([torch.stack([gram[:, 1, 1], -gram[:, 0, 1]], -1),
                            torch.stack([-gram[:, 1, 0], gram[:, 0, 0]], -1)], dim=1)
    return adjugate / safe_det.view(-1, 1, 1) @ stains.transpose(1, 2), ok


def macenko_stains(x: torch.Tensor, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                   min_tissue: float = 0.1, max_sample_px: int = 4096
                   ) -> tuple[MacenkoReference, torch.Tensor, torch.Tensor]:
    """Estimate every patch's own stain matrix and concentration percentiles.

    Args:
        x: uint8 or float in [0, 1].
        io: transmitted light intensity (0..255 scale).
        alpha: angle percentile (%) that picks the extreme stain vectors.
        beta: OD threshold below which a pixel is background.
        min_tissue: fraction of sampled pixels that must be tissue.
        max_sample_px: pixels per patch used for the estimate (0: all).

    Returns:
        ``(MacenkoReference(stain_matrix (B, 3, 2), max_concentration (B, 2)), unmixing (B, 2, 3), ok (B,))``;
        values for patches not ok are finite placeholders.

    Shape: ``(B, 3, H, W)`` -> see Returns.
    """
    check_image(x)
    od = sampled_optical_density(x, io, max_sample_px)
    tissue = stain_tissue_mask(od, beta)
    ok = enough_tissue(tissue, min_tissue)
    stains = _extreme_stains(od, tissue, _principal_plane(od, tissue, ok), alpha)
    unmix, well_conditioned = _unmixing(stains)
    max_conc = masked_quantile(unmix @ od, 0.99)
    ok = ok & well_conditioned & (max_conc > MIN_CONCENTRATION).all(dim=-1)
    ok = ok & torch.isfinite(stains).all(dim=(1, 2)) & torch.isfinite(max_conc).all(dim=-1)
    return MacenkoReference(stains, max_conc), unmix, ok


def _remix_matrix(ref: MacenkoReference, max_conc: torch.Tensor, unmix: torch.Tensor,
                  ok: torch.Tensor) -> torch.Tensor:
    """Per-patch ``S_ref diag(c_ref / c) S^+``: OD in -> normalised OD out; identity where not ok.

    Shape: ``(B, 2)``, ``(B, 2, 3)``, ``(B,)`` -> ``(B, 3, 3)``.
    """
    safe_conc = torch.where(ok.unsqueeze(-1), max_conc, torch.ones_like(max_conc))
    scale = ref.max_concentration.to(unmix) / safe_conc
    remix = ref.stain_matrix.to(unmix) @ (scale.unsqueeze(-1) * unmix)
    return torch.where(ok.view(-1, 1, 1), remix, torch.eye(3, dtype=unmix.dtype, device=unmix.device))


def macenko_normalize_flagged(x: torch.Tensor, ref: MacenkoReference, *, io: float = 240.0, alpha: float = 1.0,
                              beta: float = 0.15, min_tissue: float = 0.1, max_sample_px: int = 4096
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko-normalise a batch to ``ref`` and say which patches were normalised.

    Args:
        x: uint8 or float in [0, 1].
        ref: the reference stain matrix and concentration percentiles.
        io, alpha, beta, min_tissue, max_sample_px: see :func:`macenko_stains`.

    Returns:
        ``(out, ok)``: ``out`` float in [0, 1] (float32 for uint8 input); ``ok`` False where
        the patch passed through unchanged (too little tissue, one stain only, degenerate).

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``, ``(B,)``.
    """
    (_, max_conc), unmix, ok = macenko_stains(x, io=io, alpha=alpha, beta=beta, min_tissue=min_tissue,
                                              max_sample_px=max_sample_px)
    remix = _remix_matrix(ref, max_conc, unmix, ok)
    # log(out) = log(io / 255) - remix @ OD, with OD = log(io) - log(255 x + 1)
    bias = math.log(io / 255.0) - math.log(io) * remix.sum(dim=-1, keepdim=True)
    return pass_through(_remix_pixels(x, remix, bias), x, ok), ok


def _remix_pixels(x: torch.Tensor, remix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``exp(bias + remix @ log(255 x + 1))`` per pixel, clipped to [0, 1]: the fused C kernel
    where it applies (uint8 on the CPU), else eager torch ops.

    Shape: ``(B, 3, H, W)``, ``(B, 3, 3)``, ``(B, 3, 1)`` -> ``(B, 3, H, W)``.
    """
    if fused_remix_applies(x, remix):
        return fused_remix(x, remix, bias)
    return _remix_pixels_eager(x, remix, bias)


def _remix_pixels_eager(x: torch.Tensor, remix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`_remix_pixels` with torch ops, group by group of patches (one group on CUDA).

    Shape: ``(B, 3, H, W)``, ``(B, 3, 3)``, ``(B, 3, 1)`` -> ``(B, 3, H, W)``.
    """
    out = torch.empty(x.shape, dtype=remix.dtype, device=x.device)
    for rows in patch_chunks(x):
        log_i = log_intensity(x[rows]).flatten(2).to(remix.dtype)
        out[rows] = torch.baddbmm(bias[rows], remix[rows], log_i).clamp_(max=0.0).exp_().view_as(out[rows])
    return out


def macenko_normalize_from(x: torch.Tensor, ref: MacenkoReference, source: MacenkoReference, *, io: float = 240.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko-map a batch from given source stains (e.g. its slide's) to ``ref``.

    Every pixel of a patch goes through the same 3x3 map, tissue or not, so a slide's
    patches keep their differences in stain amount. ``ok`` is False (and the patch passes
    through) where the source is degenerate: parallel stain vectors, near-zero or
    non-finite concentrations.

    Args:
        x: uint8 or float in [0, 1].
        ref: the reference stain matrix and concentration percentiles.
        source: per patch ``stain_matrix (B, 3, 2)`` and ``max_concentration (B, 2)``.
        io: transmitted light intensity (0..255 scale).

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``, ``(B,)``.
    """
    check_image(x)
    stains, max_conc = source.stain_matrix.to(torch.float32), source.max_concentration.to(torch.float32)
    unmix, ok = _unmixing(stains)
    ok = ok & (max_conc > MIN_CONCENTRATION).all(dim=-1)
    ok = ok & torch.isfinite(stains).all(dim=(1, 2)) & torch.isfinite(max_conc).all(dim=-1)
    remix = _remix_matrix(ref, max_conc, unmix, ok)
    bias = math.log(io / 255.0) - math.log(io) * remix.sum(dim=-1, keepdim=True)
    return pass_through(_remix_pixels(x, remix, bias), x, ok), ok


def macenko_normalize(x: torch.Tensor, ref: MacenkoReference, **params: Any) -> torch.Tensor:
    """Macenko-normalise a batch to ``ref`` (patches without enough tissue pass through).

    Keyword parameters as :func:`macenko_normalize_flagged`.

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
    """
    return macenko_normalize_flagged(x, ref, **params)[0]


class Macenko(StainNormalizer):
    """Macenko normaliser; the fitted reference is in buffers ``stain_matrix`` and ``max_concentration``.

    Args:
        stain_matrix: ``(3, 2)`` reference OD vectors (H, E); default Macenko's.
        max_concentration: ``(2,)`` reference 99th-percentile concentrations; default Macenko's.
        io, alpha, beta, min_tissue, max_sample_px: see :func:`macenko_stains`.

    Shape: ``(B, 3, H, W)`` uint8 or float in [0, 1] -> ``(B, 3, H, W)`` float in [0, 1].

    Example:
        >>> norm = Macenko().fit(patches_uint8_nhwc)  # doctest: +SKIP
        >>> out = norm(batch_uint8_nchw)               # doctest: +SKIP
    """

    method = "macenko"
    PARAMS = ("io", "alpha", "beta", "min_tissue", "max_sample_px")
    POSITIVE = ("max_concentration",)

    def __init__(self, stain_matrix: Any = None, max_concentration: Any = None, *, io: float = 240.0,
                 alpha: float = 1.0, beta: float = 0.15, min_tissue: float = 0.1, max_sample_px: int = 4096) -> None:
        super().__init__()
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)
        self.min_tissue, self.max_sample_px = float(min_tissue), int(max_sample_px)
        self.register_buffer("stain_matrix", reference_tensor(stain_matrix, DEFAULT_STAIN_MATRIX))
        self.register_buffer("max_concentration", reference_tensor(max_concentration, DEFAULT_MAX_CONCENTRATION))

    @property
    def reference(self) -> MacenkoReference:
        return MacenkoReference(self.stain_matrix, self.max_concentration)

    def per_patch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return macenko_normalize_flagged(x, self.reference, **self.params)

    def from_source(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``source (B, 8)``: stain matrix (row-major) and concentration percentiles per patch."""
        stains = source[:, :6].reshape(-1, 3, 2)
        return macenko_normalize_from(x, self.reference, MacenkoReference(stains, source[:, 6:]), io=self.io)

    def patch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 8)``: the stain matrix (row-major) and the two concentration percentiles; ``ok (B,)``."""
        (stains, max_conc), _, ok = macenko_stains(x, **self.params)
        return torch.cat([stains.flatten(1), max_conc], dim=1), ok

    def canonical_statistics(self, stats: torch.Tensor) -> torch.Tensor:
        """``(8,)`` with the stain columns renormalised to unit length (a median of unit vectors is not)."""
        stains = stats[:6].reshape(3, 2)
        return torch.cat([(stains / stains.norm(dim=0, keepdim=True)).flatten(), stats[6:]])

    def set_reference(self, stats: torch.Tensor) -> None:
        """Load ``(8,)`` statistics (stain columns renormalised: :meth:`canonical_statistics`)."""
        stats = self.canonical_statistics(stats)
        self.stain_matrix.copy_(stats[:6].view(3, 2))
        self.max_concentration.copy_(stats[6:])

    def reference_dict(self) -> dict[str, Any]:
        return {"stain_matrix": self.stain_matrix.tolist(), "max_concentration": self.max_concentration.tolist()}
