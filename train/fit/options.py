"""The options of a training run (``brst-train fit``), resolved to plain values.

They are written to ``options.json`` and into every checkpoint. ``--resume`` takes them
from the checkpoint; only the *runtime* options (where and how fast it runs, and when to
stop) may differ, so the resumed run continues exactly the same computation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from brst.handlers.errors import BrstError

#: where ``make demo`` puts the demo dataset (relative to the working directory)
DEMO_DATASET = "demo/her2st.h5"
#: options a resumed run may change: they do not alter what is computed
RUNTIME_OPTIONS = frozenset({"data", "out", "device", "workers", "max_steps", "metrics_port", "metrics_host",
                             "compile", "resume"})


@dataclass
class FitOptions:
    """Every option of ``brst-train fit`` (see its ``--help`` for each one's meaning)."""

    arch: str
    data: list[str] = field(default_factory=lambda: [DEMO_DATASET])
    out: str | None = None
    pretrained: str | None = None
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-6
    seed: int = 0
    aux_weight: float = 1.0
    target: str = "log1p"
    stain: str = "macenko"
    stain_reference: str | None = None
    stain_scope: str = "patch"
    stain_fallback: str = "patch"
    input_size: int | None = None
    holdout: list[str] = field(default_factory=list)
    split_by: str = "section"
    device: str = "auto"
    amp: bool | None = None
    amp_dtype: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    workers: int = 2
    resume: str | None = None
    keep_best: int = 1
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_steps: int | None = None
    sync_bn: bool | None = None
    recipe: str = "paper"
    optimizer: str = "sgd"
    warmup_epochs: float = 0.0
    stain_jitter: float = 0.0
    density_expert: bool = False
    freeze_backbone: bool = False
    exclude: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-able values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FitOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def resume_options(stored: dict, given: dict) -> FitOptions:
    """The stored run's options, with the runtime options given on the command line.

    Runtime options not given take their defaults (a resumed run may be on another machine),
    except ``data``, which stays the stored run's unless given.

    Args:
        stored: the checkpoint's ``options``.
        given: the options the user set explicitly this time.

    Raises:
        BrstError: a given option would change the computation.
    """
    for name, value in given.items():
        if name not in RUNTIME_OPTIONS and name in stored and _plain(value) != _plain(stored[name]):
            raise BrstError(f"--{name.replace('_', '-')} {value}",
                            f"cannot change on --resume (the run used {stored[name]!r})")
    defaults = {f.name: f.default for f in fields(FitOptions) if f.name in RUNTIME_OPTIONS - {"data"}}
    runtime = {name: value for name, value in given.items() if name in RUNTIME_OPTIONS}
    return FitOptions.from_dict({**stored, **defaults, **runtime})


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
