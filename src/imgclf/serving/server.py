"""Run the predictor in ``kserve.ModelServer``: the process behind ``imgclf serve``.

The same function runs as the InferenceService's container (``--model_dir /mnt/models``), on
a laptop, and inside the deploy step's smoke test, so what the smoke test checks is what the
cluster runs. The SDK provides the v1 and v2 REST endpoints, health and readiness, and the
Prometheus ``/metrics`` endpoint; this module adds what a server exposed to clients needs:
a bound on the request body, answered with 413 before the body is parsed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from imgclf.config import ServeConfig
from imgclf.serving.source import ModelSource

log = logging.getLogger(__name__)

Scope = dict[str, Any]


class BodyLimit:
    """ASGI middleware: answer 413 to a body larger than ``max_bytes``, declared or sent.

    The body is read here (at most ``max_bytes``) and replayed to the application, so a
    client that lies in ``Content-Length`` or streams chunks cannot make the server buffer
    more than the limit.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any, size: str) -> None:
        body = json.dumps(
            {"error": f"request body {size} is larger than serve.max_body_bytes={self.max_bytes}"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, f"of {int(declared)} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, f"of more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def serve(source: ModelSource, name: str, cfg: ServeConfig, *, http_port: int) -> None:
    """Load and verify the model, then serve it until SIGTERM/SIGINT (blocks).

    Raises before listening when the model cannot be served (a checksum mismatch, a broken
    model dir): a pod that cannot serve must fail to start, not answer errors.
    """
    from imgclf.serving.kserve_sdk import ModelServer, model_server_module
    from imgclf.serving.predictor import ImageClassifier

    model = ImageClassifier(name, source, cfg)
    model.load()
    model_server_module.app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    server = ModelServer(
        http_port=http_port,
        enable_grpc=False,
        workers=1,
        enable_latency_logging=False,
    )
    server.start([model])
