"""TorchServe's per-model settings of an archive (``model-config.yaml``): no heavy imports, so the
CLI reads its defaults without loading torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """TorchServe's settings for the model (written to ``model-config.yaml``).

    Attributes:
        batch_size: most requests TorchServe groups into one handler call.
        max_batch_delay_ms: how long TorchServe waits to fill a batch.
        workers: worker processes (each loads the model; one torch thread each on a
            shared CPU when several).
        response_timeout_s: a request not answered in this time fails.
        tta: average the eight dihedral transforms and return a per-gene ``spread``.
    """

    batch_size: int = 8
    max_batch_delay_ms: int = 20
    workers: int = 1
    response_timeout_s: int = 120
    tta: bool = False

    def model_config(self) -> dict:
        """The ``model-config.yaml`` mapping (TorchServe keys plus our ``handler`` section)."""
        return {"minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.batch_size,
                "maxBatchDelay": self.max_batch_delay_ms, "responseTimeout": self.response_timeout_s,
                "handler": {"tta": self.tta}}
