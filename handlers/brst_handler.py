"""TorchServe handler: image patches in, gene expression out.

A :class:`ts.torch_handler.base_handler.BaseHandler` subclass that keeps the base
``handle`` and overrides only the four stages:

- ``initialize``: with ``$BRST_ARCHIVE_PUBLIC_KEY`` set, refuses an unpacked archive whose entries,
  model name or pinned version its signature does not cover (:mod:`brst.handlers.signed_mar`; defence
  in depth: the server checked the archive before TorchServe started, :mod:`brst.handlers.serving_store`); reads ``brst-model.json`` (weights' sha256 checked) and
  builds the one :class:`~brst.handlers.predictor.Predictor` (model, input pipeline: stain
  normalisation, resize, normalise; target inverse; TTA; autocast) on the worker's GPU
  (``gpu_id``) or the CPU, and creates the metrics; one torch thread per worker when several
  workers share a CPU;
- ``preprocess``: decodes and validates every request of the batch (:mod:`brst.handlers.envelopes`,
  :mod:`brst.handlers.decode`); a bad request is answered with HTTP 400 and a JSON
  ``{"code", "type", "message"}`` while the batch's other requests go on;
- ``inference``: stain-normalises the batch on the device (patches whose request sent its slide's
  stain statistics are mapped from them, the others follow the archive's policy: a per-patch
  estimate or none; :mod:`brst.handlers.stain_request`) and runs the model under
  ``torch.inference_mode`` (autocast on GPU), in chunks of at most ``forward_patches`` patches
  (``handler: {forward_patches: 64}`` in model-config.yaml), so the memory a batch needs is
  bounded whatever its requests hold; optionally averaging the eight dihedral
  transforms (``handler: {tta: true}``) with a per-gene ``spread``;
- ``postprocess``: per patch ``{"genes", "values", "units", "model_version", "stain", "domain"}`` on the
  expression scale (the target transform's inverse); ``stain`` says which normalisation the patch got
  and the archive's policy (:func:`brst.handlers.stain_request.stain_answer`); ``domain`` is the patch's in-domain score
  ``{"score", "out_of_domain", "threshold"}`` (:mod:`brst.handlers.domain`), or null for an
  archive without one. The scores also go to ``/metrics`` (``brst_domain_score``,
  ``brst_out_of_domain_total``).

TorchServe 0.12's gRPC frontend ignores per-request status codes, so when *every* request
of a batch fails with the same message the handler raises ``PredictionException(400)``,
which TorchServe turns into HTTP 400 and gRPC ``INVALID_ARGUMENT`` for the whole batch
(with batching off, always the case). In a mixed batch a rejected gRPC request gets
status OK with the error JSON as its body; ``brst.train.serve.client`` maps it back to an error.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from brst.handlers.archive_facts import WEIGHTS_FILE
from brst.handlers.decode import DecodeLimits
from brst.handlers.envelopes import DecodedBatch, decode_batch
from brst.handlers.errors import BrstError
from brst.handlers.geometry import PatchGeometry
from brst.handlers.handler_metrics import DECODE_SECONDS, INFERENCE_SECONDS, STAIN_SECONDS, HandlerMetrics
from brst.handlers.predictor import Predictor
from brst.handlers.signed_mar import Expected, pinned_versions, verify_directory
from brst.handlers.signing import KeyRing
from brst.handlers.stain import FUSED_CPU_REMIX, stain_from_json
from brst.handlers.stain_request import stain_answer

log = logging.getLogger(__name__)

BAD_REQUEST = 400
JSON_TYPE = "application/json"
#: most patches in one forward pass (stain normalisation and model), unless the archive says otherwise
FORWARD_PATCHES = 64


def worker_device(gpu_id: object) -> torch.device:
    """The worker's GPU when TorchServe assigned one and CUDA is there, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def error_body(err: Exception) -> dict:
    """The JSON TorchServe itself uses for errors: ``{"code", "type", "message"}``."""
    return {"code": BAD_REQUEST, "type": type(err).__name__, "message": str(err)}


class BrstHandler(BaseHandler):
    """Serve a brst archive (see module docstring)."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        self.device = worker_device(properties.get("gpu_id"))
        settings = getattr(context, "model_yaml_config", None) or {}
        handler_settings = settings.get("handler") or {}
        if self.device.type == "cpu" and int(settings.get("maxWorkers", 1)) > 1:
            torch.set_num_threads(1)
        weights = context.manifest["model"].get("serializedFile", WEIGHTS_FILE)
        self._check_signature(properties["model_dir"], context.model_name)
        self.tta = bool(handler_settings.get("tta", False))
        self.forward_patches = handler_settings.get("forward_patches", FORWARD_PATCHES)
        if type(self.forward_patches) is not int or self.forward_patches < 1:
            raise BrstError("model-config.yaml handler.forward_patches", f"{self.forward_patches!r} is not a "
                                                                         "positive integer")
        self.predictor, self.facts = Predictor.from_archive(properties["model_dir"], self.device, weights, tta=self.tta)
        self.geometry = PatchGeometry.from_data_config(self.facts["data_config"])
        self.stain_check = stain_from_json(self.facts["stain"])  # on the CPU: checks requests' statistics
        self.limits = DecodeLimits(**handler_settings.get("limits", {}))
        self.brst_metrics = HandlerMetrics(context.metrics, context.model_name)
        self.brst_metrics.started()
        self.initialized = True
        log.info("brst model %s (%s, %d genes) on %s, tta=%s, torch threads %d, fused CPU stain kernels %s, "
                 "stain %s scope %s fallback %s", self.facts["model_version"], self.facts["arch"],
                 len(self.facts["genes"]), self.device, self.tta, torch.get_num_threads(),
                 "built" if FUSED_CPU_REMIX else "not built (eager torch)", self.stain_check.method,
                 self.stain_check.scope, self.stain_check.fallback)

    @staticmethod
    def _check_signature(model_dir: str, model_name: str) -> None:
        """With ``$BRST_ARCHIVE_PUBLIC_KEY`` set, refuse (log and raise) an archive not signed for
        ``model_name`` (and its pinned version) by one of those keys."""
        try:
            keyring = KeyRing.from_environment()
            if not keyring:
                log.warning("archive signature not checked: no public key (BRST_ARCHIVE_PUBLIC_KEY)")
                return
            signed = verify_directory(model_dir, keyring, Expected(model_name, pinned_versions().get(model_name)))
            log.info("archive signed with key %s for %s version %s", signed.key_id, model_name, signed.model_version)
        except BrstError as err:
            log.error("refusing to load the archive: %s", err)
            raise

    def preprocess(self, data: list[dict]) -> DecodedBatch:
        batch = decode_batch(data, self.geometry, self.limits, self.stain_check)
        for seconds in batch.seconds:
            self.brst_metrics.observe(DECODE_SECONDS, seconds)
        for err in batch.errors.values():
            self.brst_metrics.rejected(err.reason)
            log.info("rejected request: %s (%s)", err, err.reason)
        messages = {str(err) for err in batch.errors.values()}
        if len(batch.errors) == len(data) and len(messages) == 1:
            raise PredictionException(messages.pop(), BAD_REQUEST)
        return batch

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def inference(self, batch: DecodedBatch) -> tuple[DecodedBatch, torch.Tensor | None, torch.Tensor | None,
                                                      torch.Tensor | None]:
        """The batch, with expression ``(N, G)``, TTA spread ``(N, G)`` or None, and in-domain
        scores ``(N,)`` or None (CPU float32), computed ``forward_patches`` patches at a time."""
        if len(batch.patches) == 0:
            return batch, None, None, None
        step = self.forward_patches
        chunks = [self._forward(batch.patches[start:start + step], batch.stain_source[start:start + step],
                                batch.has_stain[start:start + step])
                  for start in range(0, len(batch.patches), step)]
        self.brst_metrics.patches(len(batch.patches))
        values, spread, scores = (None if chunks[0][k] is None else torch.cat([chunk[k] for chunk in chunks])
                                  for k in range(3))
        if scores is not None:
            self.brst_metrics.domain(scores.tolist(), int(self.predictor.domain.out_of_domain(scores).sum()))
        return batch, values, spread, scores

    def _forward(self, patches: np.ndarray, stain_source: np.ndarray, has_stain: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """uint8 ``(B, P, P, 3)``, stain statistics float64 ``(B, K)`` and their flags ``(B,)`` (numpy) ->
        expression ``(B, G)``, spread ``(B, G)`` or None and in-domain scores ``(B,)`` or None, on the CPU."""
        with torch.inference_mode():
            pixels = torch.from_numpy(patches).to(self.device, non_blocking=True)
            with self.brst_metrics.timer(STAIN_SECONDS, self._synchronize):
                x = self._model_input(pixels, stain_source, has_stain)
            with self.brst_metrics.timer(INFERENCE_SECONDS, self._synchronize):
                values, spread = self.predictor.expression(x)
                scores = self.predictor.domain_scores(x)
        return values.cpu(), None if spread is None else spread.cpu(), None if scores is None else scores.cpu()

    def _model_input(self, pixels: torch.Tensor, stain_source: np.ndarray, has_stain: np.ndarray) -> torch.Tensor:
        """The model input ``(B, 3, S, S)`` of uint8 ``(B, P, P, 3)`` pixels on the device: patches with
        statistics mapped from them, the others by the archive's policy, in the batch's order."""
        model_input = self.predictor.model_input
        if not has_stain.any():
            return model_input(pixels)
        source = torch.from_numpy(stain_source).to(self.device, torch.float32)
        if has_stain.all():
            return model_input(pixels, stain_source=source)
        given = torch.from_numpy(np.flatnonzero(has_stain)).to(self.device)
        other = torch.from_numpy(np.flatnonzero(~has_stain)).to(self.device)
        mapped = model_input(pixels[given], stain_source=source[given])
        x = mapped.new_empty((len(pixels), *mapped.shape[1:]))
        x[given] = mapped
        x[other] = model_input(pixels[other])
        return x

    def postprocess(self, prediction: tuple[DecodedBatch, torch.Tensor | None, torch.Tensor | None,
                                            torch.Tensor | None]) -> list[str]:
        """One JSON text per request: a patch's answer, a list of them, or an error."""
        batch, values, spread, scores = prediction
        answers = []
        for idx, many in enumerate(batch.many):
            self.context.set_response_content_type(idx, JSON_TYPE)
            if idx in batch.errors:
                self.context.set_response_status(BAD_REQUEST, "Bad Request", idx)
                answers.append(json.dumps(error_body(batch.errors[idx])))
                continue
            rows = [self._patch_answer(values[i], None if spread is None else spread[i],
                                       None if scores is None else float(scores[i]), bool(batch.has_stain[i]))
                    for i in (batch.owner == idx).nonzero()[0]]
            answers.append(json.dumps(rows if many else rows[0]))
        return answers

    def _patch_answer(self, values: torch.Tensor, spread: torch.Tensor | None, score: float | None,
                      with_stain: bool) -> dict:
        answer = {"genes": self.facts["genes"], "values": values.tolist(), "units": self.facts["units"],
                  "model_version": self.facts["model_version"], "stain": stain_answer(self.stain_check, with_stain),
                  "domain": self._domain_answer(score)}
        if spread is not None:
            answer["spread"] = spread.tolist()
        return answer

    def _domain_answer(self, score: float | None) -> dict | None:
        """``{"score", "out_of_domain", "threshold"}`` of one patch, or None without an in-domain score."""
        if score is None:
            return None
        threshold = self.predictor.domain.threshold
        return {"score": score, "out_of_domain": score > threshold, "threshold": threshold}
