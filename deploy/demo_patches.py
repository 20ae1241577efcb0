"""The demo's patches and what was measured under them (used by deploy/demo.sh).

``pick``: from the run's held-out section, take the spots with the lowest, the median and
the highest measured value of the gene the run validated best, save their patches as PNG
(``1-lowest-GENE_<section>_<spot>.png``, ``2-median-...``, ``3-highest-...``)
and their measured expression (the run's target units) of the run's four best-validated
genes as JSON. ``compare``: read ``brst-train predict`` JSON lines on stdin and print each
patch's predicted value beside the measured one for those genes.

    python deploy/demo_patches.py pick RUN/last.pt DATA.h5 OUT_DIR
    brst-train predict ... OUT_DIR/*.png | python deploy/demo_patches.py compare OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from brst.train.checkpoint import load_checkpoint
from brst.train.data import open_dataset
from brst.train.evaluate.fold import measured_expression
from brst.train.slide.drawn_genes import checkpoint_validation_r

#: genes shown per patch
N_GENES = 4
MEASURED = "measured.json"


def pick(checkpoint: str, data: str, out_dir: str) -> None:
    ckpt = load_checkpoint(checkpoint)
    index = open_dataset(data)
    held_out = set(ckpt["split"]["holdout"])
    idx = np.flatnonzero(np.isin(index.spots[ckpt["split"]["by"]].astype(str), list(held_out)))
    r = checkpoint_validation_r(ckpt)
    genes = sorted(r, key=r.get, reverse=True)[:N_GENES] or ckpt["genes"][:N_GENES]
    values = measured_expression(index, idx, genes, ckpt["target"]["kind"])
    order = np.argsort(values[:, 0], kind="stable")
    chosen = [order[0], order[len(order) // 2], order[-1]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    measured = {"genes": genes, "units": ckpt["target"]["kind"], "patches": {}}
    for rank, k in zip(("1-lowest", "2-median", "3-highest"), chosen):
        row = int(idx[k])
        name = f"{rank}-{genes[0]}_{index.spots['section'][row]}_{index.spots['spot_id'][row]}.png"
        Image.fromarray(index.patches([row])[0]).save(out / name)
        measured["patches"][name] = [round(float(v), 3) for v in values[k]]
    (out / MEASURED).write_text(json.dumps(measured, indent=1))


def compare(out_dir: str) -> None:
    measured = json.loads((Path(out_dir) / MEASURED).read_text())
    genes = measured["genes"]
    for line in sys.stdin:
        answer = json.loads(line)
        name, prediction = Path(answer["image"]).name, answer["prediction"]
        predicted = dict(zip(prediction["genes"], prediction["values"]))
        pairs = ", ".join(f"{g} {predicted[g]:.2f} (measured {m:.2f})"
                          for g, m in zip(genes, measured["patches"][name]))
        print(f"{name}: {pairs}  [{prediction['units']}]")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"pick": pick, "compare": compare}[command](*args)
