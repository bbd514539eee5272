"""``imgclf serve`` in a subprocess on loopback, spoken to over real HTTP in both protocols."""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import io
import json
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import ServedModel
from imgclf.config import ServeConfig
from imgclf.serving.smoke import ServerProcess, wait_ready

NAME = "digits"
# Small limits so the tests can exceed them cheaply; the defaults are in params.yaml.
CFG = ServeConfig(max_body_bytes=200_000, max_images_per_request=8, max_image_pixels=300 * 300)
HANG_GUARD_S = 300.0


def _start(model_dir: Path, workdir: Path, cfg: ServeConfig = CFG) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return ServerProcess(model_dir, NAME, cfg, workdir)


@pytest.fixture(scope="module")
def server(
    served_model: ServedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = _start(served_model.model_dir, tmp_path_factory.mktemp("serve"))
    try:
        problem = proc.wait_listening(HANG_GUARD_S)
        assert problem is None, (problem, proc.log_tail(20))
        import time

        assert wait_ready(proc.base_url, NAME, time.monotonic() + HANG_GUARD_S) is None
        yield proc
    finally:
        proc.stop()


def _expected(served: ServedModel) -> dict[str, str]:
    with (served.eval_dir / "predictions.csv").open(newline="") as fh:
        return {row["path"]: row["predicted"] for row in csv.DictReader(fh)}


def _call(
    url: str, body: bytes | None = None, content_type: str = "application/json"
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=HANG_GUARD_S) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _v1(server: ServerProcess, *images: bytes) -> tuple[int, Any]:
    body = {"instances": [{"image": {"b64": _b64(data)}} for data in images]}
    return _call(f"{server.base_url}/v1/models/{NAME}:predict", json.dumps(body).encode())


def _v2(server: ServerProcess, inputs: list[dict[str, Any]]) -> tuple[int, Any]:
    body = json.dumps({"inputs": inputs}).encode()
    return _call(f"{server.base_url}/v2/models/{NAME}/infer", body)


def test_v1_answers_equal_the_evaluate_steps_predictions(
    server: ServerProcess, served_model: ServedModel
) -> None:
    expected = _expected(served_model)
    assert len(expected) == 24
    for path, label in expected.items():
        status, body = _v1(server, (served_model.dataset_dir / path).read_bytes())
        assert status == 200, body
        (prediction,) = body["predictions"]
        assert prediction["label"] == label, path
        top = prediction["top_k"]
        assert top[0]["label"] == label and len(top) == 3
        assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)


def test_v2_bytes_batch_and_fp32_tensor_answer_the_same_labels(
    server: ServerProcess, served_model: ServedModel
) -> None:
    from imgclf.contracts import read_model_json
    from imgclf.training.presets import ClassificationPresetEval

    expected = _expected(served_model)
    paths = sorted(expected)[:5]
    images = [_b64((served_model.dataset_dir / p).read_bytes()) for p in paths]
    status, body = _v2(
        server, [{"name": "image", "datatype": "BYTES", "shape": [len(paths)], "data": images}]
    )
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["shape"] == [len(paths), 3]
    labels = outputs["label"]["data"][::3]
    assert labels == [expected[p] for p in paths]

    meta = read_model_json(served_model.model_dir)
    transform = ClassificationPresetEval(
        size=tuple(meta["input_size"][1:]), mean=meta["mean"], std=meta["std"]
    )
    with Image.open(served_model.dataset_dir / paths[0]) as image:
        tensor = transform(image).unsqueeze(0).numpy()
    status, body = _v2(
        server,
        [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(tensor.shape),
                "data": tensor.reshape(-1).tolist(),
            }
        ],
    )
    assert status == 200, body
    assert body["outputs"][0]["data"][0] == expected[paths[0]]


def test_health_metadata_and_metrics_endpoints(server: ServerProcess) -> None:
    base = server.base_url
    assert _call(f"{base}/v2/health/live")[0] == 200
    assert _call(f"{base}/v2/health/ready") == (200, {"ready": True})
    assert _call(f"{base}/v2/models/{NAME}/ready")[1]["ready"] is True
    status, meta = _call(f"{base}/v2/models/{NAME}")
    assert status == 200
    assert {i["datatype"] for i in meta["inputs"]} == {"BYTES", "FP32"}
    assert [o["name"] for o in meta["outputs"]] == ["label", "probability"]
    _, text = _call(f"{base}/metrics")
    for metric in (
        "imgclf_serve_requests_total",
        "imgclf_serve_request_seconds_bucket",
        "imgclf_serve_batch_images_bucket",
    ):
        assert metric in text


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def _bad_requests(served: ServedModel) -> dict[str, tuple[str, bytes, str, int, str]]:
    """name -> (path suffix, body, content type, expected status, text in the error)."""
    good = next((served.dataset_dir / "images" / "test").rglob("*.png")).read_bytes()
    gray16 = _png(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)))

    def v1(*images: bytes) -> bytes:
        return json.dumps({"instances": [{"image": {"b64": _b64(i)}} for i in images]}).encode()

    predict = f"/v1/models/{NAME}:predict"
    infer = f"/v2/models/{NAME}/infer"
    json_type = "application/json"
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3, 5, 5], "data": [0.0] * 75}
    return {
        "not an image": (predict, v1(b"hello, not a picture"), json_type, 400, "not an image"),
        "not base64": (
            predict, b'{"instances": [{"image": {"b64": "@@@"}}]}', json_type, 400, "base64",
        ),
        "truncated PNG": (predict, v1(good[: len(good) // 2]), json_type, 400, "truncated"),
        "decompression bomb": (
            predict, v1(_bomb_png(20_000, 20_000)), json_type, 400, "max_image_pixels",
        ),
        "too many pixels": (
            predict, v1(_bomb_png(1000, 1000)), json_type, 400, "max_image_pixels=90000",
        ),
        "16-bit mode": (predict, v1(gray16), json_type, 400, "mode"),
        "too many images": (predict, v1(*[good] * 9), json_type, 400, "max_images_per_request"),
        "no instances": (predict, b'{"instances": []}', json_type, 400, "no images"),
        "wrong tensor shape": (
            infer, json.dumps({"inputs": [tensor]}).encode(), json_type, 400, "not [n, 3, 16, 16]",
        ),
        "empty body": (predict, b"", json_type, 400, ""),
        "not JSON": (predict, b"\x00\x01 nonsense", "text/plain", 400, "not JSON"),
        "v2 not JSON": (infer, b"{nope", json_type, 422, "JSON decode error"),
        "unknown model": ("/v1/models/nope:predict", v1(good), json_type, 404, "nope"),
        "oversized body": (predict, b"x" * 300_000, json_type, 413, "max_body_bytes"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "not an image",
        "not base64",
        "truncated PNG",
        "decompression bomb",
        "too many pixels",
        "16-bit mode",
        "too many images",
        "no instances",
        "wrong tensor shape",
        "empty body",
        "not JSON",
        "v2 not JSON",
        "unknown model",
        "oversized body",
    ],
)
def test_bad_request_gets_4xx_and_the_server_keeps_serving(
    case: str, server: ServerProcess, served_model: ServedModel
) -> None:
    suffix, body, content_type, expected_status, text = _bad_requests(served_model)[case]
    status, answer = _call(server.base_url + suffix, body, content_type)
    assert status == expected_status, answer
    assert 400 <= status < 500
    assert text in json.dumps(answer)
    path, label = next(iter(_expected(served_model).items()))
    status, answer = _v1(server, (served_model.dataset_dir / path).read_bytes())
    assert status == 200 and answer["predictions"][0]["label"] == label


def test_32_concurrent_clients_get_correct_answers_and_share_batches(
    server: ServerProcess, served_model: ServedModel
) -> None:
    expected = _expected(served_model)
    files = {p: (served_model.dataset_dir / p).read_bytes() for p in expected}
    order = [p for _ in range(6) for p in files][: 32 * 4]

    def client(start: int) -> list[str]:
        wrong = []
        for path in order[start::32]:
            status, body = _v1(server, files[path])
            if status != 200 or body["predictions"][0]["label"] != expected[path]:
                wrong.append(f"{path}: {status} {body}")
        return wrong

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(client, range(32)))
    assert [w for r in results for w in r] == []
    _, text = _call(f"{server.base_url}/metrics")
    sizes = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("imgclf_serve_batch_images_bucket")
    }
    # Some forward pass served more than one request: requests were batched.
    assert sizes["1.0"] < sizes["+Inf"]


def test_a_flipped_byte_in_the_weights_refuses_the_start(
    served_model: ServedModel, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(served_model.model_dir, model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = _start(model, tmp_path / "serve")
    try:
        problem = proc.wait_listening(HANG_GUARD_S)
    finally:
        proc.stop()
    assert problem is not None and "exited with code 1" in problem
    last = proc.log_tail(1)[0]
    assert "model.safetensors" in last and "sha256" in last and "checksums.json" in last


def test_serving_a_registry_version_checks_the_ready_list(
    served_model: ServedModel, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from imgclf.registry import ModelRegistry

    reg = ModelRegistry.open(tmp_path / "registry")
    version = reg.publish(NAME, served_model.model_dir, {"passed": True}, {})
    reg.promote(NAME, version)
    stored = tmp_path / "registry" / reg.model_prefix(NAME, version) / "model.json"
    stored.write_text(stored.read_text().replace('"classes"', '"classes" '))
    result = subprocess.run(
        [sys.executable, "-m", "imgclf", "serve", "--registry", str(tmp_path / "registry"),
         "--model", NAME, "--http_port", "0"],
        capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "model.json" in result.stderr and "READY" in result.stderr, result.stderr
