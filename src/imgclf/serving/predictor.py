"""The KServe predictor: one ``kserve.Model`` for ``imgclf serve``, the cluster and the smoke test.

Requests in either KServe protocol become one normalised tensor per image, through the
evaluation transform recorded in ``model.json`` (the same function the evaluate step uses),
then go through the :class:`~imgclf.serving.batching.MicroBatcher`, and come back as the
top-k labels with probabilities:

- v1 ``POST /v1/models/<name>:predict``:
  ``{"instances": [{"image": {"b64": "<base64 PNG/JPEG>"}}, ...]}`` (an instance may also be
  the base64 string itself, or ``{"b64": ...}`` / ``{"data": ...}``) answers
  ``{"predictions": [{"label", "index", "probability", "top_k": [{"label", "probability"}]}]}``.
- v2 ``POST /v2/models/<name>/infer`` (Open Inference Protocol): one input, either
  ``BYTES`` (each element an encoded image; base64 in JSON, raw with the binary extension)
  or ``FP32`` of shape ``[n, C, H, W]`` (already normalised, the model's input size); the
  outputs are ``label`` (BYTES) and ``probability`` (FP32), both ``[n, k]``.

Anything wrong with a request is :class:`kserve.errors.InvalidInput` (HTTP 400) with a
message naming the instance; the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prometheus_client import Counter, Histogram

from imgclf.config import ServeConfig
from imgclf.serving.batching import MicroBatcher
from imgclf.serving.images import BadImage, b64decode, decode_image
from imgclf.serving.kserve_sdk import (
    InferOutput,
    InferRequest,
    InferResponse,
    InvalidInput,
    Model,
)
from imgclf.serving.source import ModelSource, verify

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "imgclf_serve_requests",
    "Inference requests by protocol and outcome",
    ["model_name", "protocol", "outcome"],
)
IMAGES = Counter("imgclf_serve_images", "Images classified", ["model_name"])
LATENCY = Histogram(
    "imgclf_serve_request_seconds",
    "Time from decoding a request to its answer (excludes HTTP parsing)",
    ["model_name", "protocol"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BATCH_SIZE = Histogram(
    "imgclf_serve_batch_images",
    "Images per forward pass",
    ["model_name"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FORWARD = Histogram(
    "imgclf_serve_forward_seconds",
    "Duration of one batched forward pass",
    ["model_name"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

#: The v2 input names the metadata advertises (any name is accepted; the datatype decides).
IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
_V1_KEYS = ("image", "image_bytes", "b64", "data")


@dataclass
class Prepared:
    """A decoded request on its way through predict and postprocess."""

    protocol: str
    inputs: torch.Tensor | list[Any]  # a ready tensor (v2 FP32) or decoded PIL images
    started: float
    request_id: str | None = None
    probabilities: torch.Tensor | None = None


class ImageClassifier(Model):
    """Serve one verified model dir under ``name``."""

    def __init__(self, name: str, source: ModelSource, cfg: ServeConfig) -> None:
        super().__init__(name)
        self.source = source
        self.cfg = cfg
        self.meta: dict[str, Any] = {}
        self.classes: list[str] = []
        self.version = source.version

    # -- loading --------------------------------------------------------------------------

    def load(self) -> bool:
        """Verify every file's sha256, rebuild the model from safetensors + ``model.json``
        (never unpickling), warm it up, and mark the model ready."""
        from imgclf.errors import ConfigError
        from imgclf.training import engine
        from imgclf.training.presets import ClassificationPresetEval

        if self.cfg.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"serve.device={self.cfg.device!r}: expected auto, cpu or cuda")
        verify(self.source)
        self.device = engine.select_device(self.cfg.device)
        self.amp_dtype, _ = engine.amp_settings(self.device)
        self.batcher = MicroBatcher(
            self._forward_batch,
            max_batch=self.cfg.max_batch_size,
            max_wait_s=self.cfg.max_batch_wait_ms / 1000.0,
            on_batch=self._observe_batch,
        )
        self.batcher.run_on_worker(self._load_model)
        self.classes = [str(c) for c in self.meta["classes"]]
        self.transform = ClassificationPresetEval(
            size=self.input_shape[1:], mean=self.meta["mean"], std=self.meta["std"]
        )
        self.top_k = min(self.cfg.top_k, len(self.classes))
        self.ready = True
        log.info(
            "serving %s as %r on %s: %s, %d classes, input %s",
            self.source.description, self.name, self.device, self.meta.get("architecture"),
            len(self.classes), "x".join(map(str, self.input_shape)),
        )  # fmt: skip
        return self.ready

    def _load_model(self) -> None:
        """Build, place and warm up the model (on the forward thread: see run_on_worker)."""
        from imgclf.training import engine
        from imgclf.training.models import load_model_dir

        model, meta = load_model_dir(self.source.model_dir)
        self.model = engine.prepare_model(model, self.device)
        self.meta = meta
        self.input_shape = tuple(int(d) for d in meta["input_size"])
        for size in (1, self.cfg.max_batch_size):  # first-call costs before ready
            self._forward(torch.zeros(size, *self.input_shape))

    def stop(self) -> None:
        """Release the batcher's worker thread when the server shuts down."""
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()
        super().stop()

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        from imgclf.training import engine

        with torch.inference_mode():
            logits = engine.forward_logits(self.model, images, self.device, self.amp_dtype)
            return logits.softmax(dim=1).cpu()

    def _forward_batch(self, items: list[torch.Tensor | list[Any]]) -> torch.Tensor:
        """Class probabilities of a batch: decoded images go through the evaluation
        transform here, on the forward thread (see :class:`MicroBatcher`)."""
        with torch.inference_mode():
            tensors = [
                item if isinstance(item, torch.Tensor)
                else torch.stack([self.transform(image) for image in item])
                for item in items
            ]  # fmt: skip
            return self._forward(torch.cat(tensors) if len(tensors) > 1 else tensors[0])

    def _observe_batch(self, images: int, seconds: float) -> None:
        BATCH_SIZE.labels(self.name).observe(images)
        FORWARD.labels(self.name).observe(seconds)

    # -- metadata (v2 GET /v2/models/<name>) ------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        """Either input form the v2 protocol accepts."""
        return [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, *self.input_shape]},
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        """Top-k labels and their probabilities per image."""
        return [
            {"name": "label", "datatype": "BYTES", "shape": [-1, self.top_k]},
            {"name": "probability", "datatype": "FP32", "shape": [-1, self.top_k]},
        ]

    # -- request path -----------------------------------------------------------------------

    def validate(self, payload: Any) -> Any:
        """Requests are validated while decoding (:meth:`preprocess`); nothing to add."""
        return payload

    def _image(self, data: bytes, where: str) -> Any:
        return decode_image(data, max_pixels=self.cfg.max_image_pixels, where=where)

    def _count(self, n: int, where: str) -> None:
        if n < 1:
            raise BadImage(f"{where}: no images in the request")
        if n > self.cfg.max_images_per_request:
            raise BadImage(
                f"{where}: {n} images is more than serve.max_images_per_request="
                f"{self.cfg.max_images_per_request}"
            )

    def _v1_bytes(self, instance: Any, where: str) -> bytes:
        if isinstance(instance, str):
            return b64decode(instance, where)
        if isinstance(instance, dict):
            for key in _V1_KEYS:
                if key in instance:
                    value = instance[key]
                    if isinstance(value, dict) and "b64" in value:
                        value = value["b64"]
                    return b64decode(value, f"{where}.{key}")
        raise BadImage(
            f'{where}: expected {{"image": {{"b64": "<base64 PNG or JPEG>"}}}} or a base64 string'
        )

    def _prepare_v1(self, payload: dict[str, Any]) -> list[Any]:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise BadImage('request: expected {"instances": [...]} (KServe v1 protocol)')
        self._count(len(instances), "instances")
        return [
            self._image(self._v1_bytes(inst, f"instances[{i}]"), f"instances[{i}]")
            for i, inst in enumerate(instances)
        ]

    def _prepare_v2(self, request: InferRequest) -> torch.Tensor | list[Any]:
        if len(request.inputs) != 1:
            raise BadImage(
                f"inputs: expected exactly one input ({IMAGE_INPUT} BYTES or {TENSOR_INPUT} "
                f"FP32), got {len(request.inputs)}"
            )
        item = request.inputs[0]
        where = f"inputs[{item.name!r}]"
        if item.datatype == "BYTES":
            try:
                elements = list(np.asarray(item.as_numpy(), dtype=object).reshape(-1))
            except (ValueError, TypeError) as exc:
                raise BadImage(
                    f"{where}: shape {item.shape} does not fit the data: {exc}"
                ) from None
            self._count(len(elements), where)
            images = []
            for i, element in enumerate(elements):
                at = f"{where}[{i}]"
                data = element if isinstance(element, bytes) else str(element).encode()
                if not _looks_like_image(data):
                    data = b64decode(data, at)
                images.append(self._image(data, at))
            return images
        if item.datatype == "FP32":
            expected = list(self.input_shape)
            if len(item.shape) != 4 or list(item.shape[1:]) != expected:
                raise BadImage(
                    f"{where}: FP32 shape {list(item.shape)} is not [n, "
                    f"{', '.join(map(str, expected))}]"
                )
            try:
                array = item.as_numpy()
            except (ValueError, TypeError) as exc:
                raise BadImage(f"{where}: data does not fit shape {item.shape}: {exc}") from None
            self._count(int(array.shape[0]), where)
            if not np.isfinite(array).all():
                raise BadImage(f"{where}: contains NaN or infinity")
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        raise BadImage(f"{where}: datatype {item.datatype!r} is not BYTES or FP32")

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Prepared:
        """Decode every image of the request (on a worker thread: the event loop keeps
        accepting requests meanwhile); the transform runs with the forward pass."""
        started = time.perf_counter()
        if isinstance(payload, bytes | bytearray):
            # KServe passes a body through undecoded when its Content-Type is not JSON (curl
            # -d sends form-urlencoded): JSON is what both protocols speak, so try it.
            try:
                payload = json.loads(payload)
            except ValueError:
                REQUESTS.labels(self.name, "v1", "bad_request").inc()
                raise InvalidInput("request: body is not JSON") from None
        if isinstance(payload, InferRequest):
            protocol, prepare = "v2", self._prepare_v2
        elif isinstance(payload, dict):
            protocol, prepare = "v1", self._prepare_v1
        else:
            REQUESTS.labels(self.name, "v1", "bad_request").inc()
            raise InvalidInput("request: expected a JSON body (Content-Type: application/json)")
        try:
            inputs = await asyncio.get_running_loop().run_in_executor(None, prepare, payload)
        except BadImage as exc:
            REQUESTS.labels(self.name, protocol, "bad_request").inc()
            raise InvalidInput(str(exc)) from None
        request_id = payload.id if isinstance(payload, InferRequest) else None
        return Prepared(protocol, inputs, started, request_id)

    async def predict(self, payload: Prepared, headers: dict[str, str] | None = None) -> Prepared:
        """Class probabilities for every image, computed in a shared batch."""
        payload.probabilities = await self.batcher.submit(payload.inputs, len(payload.inputs))
        return payload

    async def postprocess(
        self, result: Prepared, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse:
        """Top-k labels with probabilities, in the protocol the request came in."""
        assert result.probabilities is not None
        top = result.probabilities.topk(self.top_k, dim=1)
        probs = top.values.tolist()
        indices = top.indices.tolist()
        n = len(indices)
        IMAGES.labels(self.name).inc(n)
        REQUESTS.labels(self.name, result.protocol, "ok").inc()
        LATENCY.labels(self.name, result.protocol).observe(time.perf_counter() - result.started)
        if result.protocol == "v1":
            return {
                "predictions": [
                    {
                        "label": self.classes[idx[0]],
                        "index": idx[0],
                        "probability": p[0],
                        "top_k": [
                            {"label": self.classes[i], "probability": q}
                            for i, q in zip(idx, p, strict=True)
                        ],
                    }
                    for idx, p in zip(indices, probs, strict=True)
                ]
            }
        labels = [self.classes[i] for row in indices for i in row]
        outputs = [
            InferOutput("label", [n, self.top_k], "BYTES", labels),
            InferOutput("probability", [n, self.top_k], "FP32", [q for row in probs for q in row]),
        ]
        return InferResponse(
            response_id=result.request_id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            model_version=None if self.version is None else str(self.version),
        )


_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"BM",
    b"GIF87a",
    b"GIF89a",
    b"RIFF",
    b"II*\x00",
    b"MM\x00*",
)


def _looks_like_image(data: bytes) -> bool:
    """Raw image bytes (binary extension) rather than base64 text (JSON)."""
    return data.startswith(_MAGIC)
