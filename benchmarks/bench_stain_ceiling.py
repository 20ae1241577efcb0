"""How fast can per-pixel Macenko remixing be on this CPU at all? Ceilings beside torchstain.

Issue 3 asks for 20x torchstain's per-image Macenko on the CPU. Whatever the stain
estimate costs, every output pixel needs ``exp(bias + M @ log(255 x + 1))``: one ``log`` and
one ``exp`` per value, a 3x3 product per pixel and a float32 output. This script times, on
the same real HER2ST patches (uint8 ``(64, 3, 224, 224)``) and in the same run:

reference:  torchstain's torch Macenko, one patch at a time (as bench_stain.py);
ours:       brst's Macenko (estimate + remix), batched;
floor_eager: only ``log1p_`` then ``exp_`` in place on a preallocated float32 batch (no
            estimate, no product, no allocation): no eager-torch implementation can beat it;
fused_cpp:  (with a C++ compiler) the remix alone as one hand-written AVX2 loop over uint8
            input (log via a 256-entry table, torch's vectorised ``exp``), built with
            ``torch.utils.cpp_extension.load_inline``, writing into a preallocated output.

The last line gives ``ours``/``reference``/``ratio`` as every benchmark does, each ceiling's patches/s
and ratio, and ``goal_20x``, the rate the issue asks for.

    python benchmarks/bench_stain_ceiling.py [--threads N] [--rounds 5] [--no-cpp]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Callable

import torch
from bench_stain import ROOT, real_patches
from torchstain.torch.normalizers import TorchMacenkoNormalizer

from brst.handlers.stain import Macenko

log = logging.getLogger("bench_stain_ceiling")

FUSED_REMIX_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
using Vec = at::vec::Vectorized<float>;

// out[b, c, p] = exp(min(0, bias[b, c] + sum_j remix[b, c, j] * log1p(x[b, j, p]))), x uint8.
void fused_remix(torch::Tensor x, torch::Tensor remix, torch::Tensor bias, torch::Tensor out) {
  const int64_t n_px = x.size(2) * x.size(3);
  const uint8_t* xp = x.data_ptr<uint8_t>();
  const float* mp = remix.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t first, int64_t last) {
    float table[256];
    for (int v = 0; v < 256; ++v) table[v] = std::log1p(static_cast<float>(v));
    alignas(32) float lane[3][Vec::size()];
    for (int64_t b = first; b < last; ++b) {
      const uint8_t* in = xp + b * 3 * n_px;
      const float* m = mp + b * 9;
      for (int64_t p = 0; p + Vec::size() <= n_px; p += Vec::size()) {
        for (int c = 0; c < 3; ++c)
          for (int k = 0; k < Vec::size(); ++k) lane[c][k] = table[in[c * n_px + p + k]];
        Vec r = Vec::loadu(lane[0]), g = Vec::loadu(lane[1]), bl = Vec::loadu(lane[2]);
        for (int c = 0; c < 3; ++c) {
          Vec y = Vec(bp[b * 3 + c]) + Vec(m[c * 3]) * r + Vec(m[c * 3 + 1]) * g + Vec(m[c * 3 + 2]) * bl;
          at::vec::minimum(y, Vec(0.f)).exp().store(op + (b * 3 + c) * n_px + p);
        }
      }
    }
  });
}
"""


def best_rate(run: Callable[[], object], n_patches: int, rounds: int) -> float:
    """Best patches/s over ``rounds`` calls of ``run`` (after one warm-up)."""
    run()
    best_s = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best_s = min(best_s, time.perf_counter() - start)
    return n_patches / best_s


def build_fused() -> Callable[..., None] | None:
    """The fused remix kernel, or None (and a log line) when it cannot be built here."""
    from torch.utils.cpp_extension import load_inline
    try:
        module = load_inline("brst_bench_fused_remix", cpp_sources=FUSED_REMIX_CPP, functions=["fused_remix"],
                             extra_cflags=["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2",
                                           "-DCPU_CAPABILITY=AVX2", "-fopenmp"])
    except (RuntimeError, OSError) as error:
        log.warning("fused C++ kernel not built (%s); skipping it", error)
        return None
    return module.fused_remix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-cpp", action="store_true", help="Skip the fused C++ kernel.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    patches = real_patches(ROOT, ["C2", "C5"], 32)
    n = len(patches)
    reference = TorchMacenkoNormalizer()
    reference.fit(patches[0])
    ours = Macenko(reference.HERef, reference.maxCRef)
    buffer = torch.empty(patches.shape, dtype=torch.float32)
    remix = (0.9 * torch.eye(3) + 0.05).expand(n, 3, 3).contiguous()
    bias = torch.full((n, 3, 1), math.log(240 / 255) - math.log(240) * 1.05)

    def floor_eager() -> None:
        buffer.copy_(patches).log1p_().exp_()

    rates = {"reference": best_rate(lambda: [reference.normalize(p, stains=False) for p in patches], n, args.rounds)}
    with torch.inference_mode():
        rates["ours"] = best_rate(lambda: ours(patches), n, args.rounds)
        rates["floor_eager"] = best_rate(floor_eager, n, args.rounds)
        fused = None if args.no_cpp else build_fused()
        if fused is not None:
            rates["fused_cpp"] = best_rate(lambda: fused(patches, remix, bias, buffer), n, args.rounds)
    result = {"name": "stain_ceiling", "ours": round(rates["ours"], 1), "reference": round(rates["reference"], 1),
              "unit": "patches/s", "ratio": round(rates["ours"] / rates["reference"], 2), "patches": n,
              "torch_threads": torch.get_num_threads(), "goal_20x": round(20 * rates["reference"], 1)}
    for name in ("floor_eager", "fused_cpp"):
        if name in rates:
            result[name] = round(rates[name], 1)
            result[f"ratio_{name}"] = round(rates[name] / rates["reference"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
