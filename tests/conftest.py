"""Shared pytest fixtures: tiny image trees written with PIL and a real local HTTP server."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def make_images() -> Callable[..., list[Path]]:
    """Factory: ``make_images(folder, n, size=(12, 10), mode="RGB", fmt="png", prefix="img")``.

    Writes ``n`` images with distinct random pixels (so no two files share a hash) named
    ``<prefix>_<i>.<fmt>`` and returns their paths; successive calls never repeat pixels.
    """
    rng = np.random.default_rng(1234)

    def make(
        folder: Path,
        n: int,
        *,
        size: tuple[int, int] = (12, 10),
        mode: str = "RGB",
        fmt: str = "png",
        prefix: str = "img",
    ) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        paths = []
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
            image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
            path = folder / f"{prefix}_{i}.{fmt}"
            image.save(path)
            paths.append(path)
        return paths

    return make


@dataclasses.dataclass(frozen=True)
class StaticServer:
    """A running ``http.server`` on 127.0.0.1 serving the files under ``root``."""

    root: Path
    base_url: str

    def url(self, name: str) -> str:
        """The URL of ``root / name``."""
        return f"{self.base_url}/{name}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep request lines out of the test output."""


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[StaticServer]:
    """A real HTTP server (stdlib, in a thread) serving a fresh ``tmp_path / "www"``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield StaticServer(root=root, base_url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


pytest_plugins = ["s3_server"]  # session S3 server fixtures (tests/s3_server.py)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A trained model dir, the dataset it was evaluated on and evaluate's output."""

    dataset_dir: Path
    model_dir: Path
    eval_dir: Path


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    """A real (tiny) model trained and evaluated by the steps, for the serving tests.

    Trained, not random: near-uniform outputs would make the top label depend on float
    rounding, and the tests compare the server's labels with evaluate's.
    """
    from _dataset_factory import build_tiny_dataset
    from _repo_copy import TINY_TRAIN
    from imgclf.config import EvaluateConfig, RegistryConfig, TrainConfig
    from imgclf.steps import evaluate, train

    root = tmp_path_factory.mktemp("served")
    dataset = build_tiny_dataset(
        root / "dataset", size=16, per_split={"train": 16, "val": 6, "test": 8}
    )
    cfg = TrainConfig(
        **{**TINY_TRAIN, "epochs": 3, "max_steps_per_epoch": 0},
        lr=0.01, backbone_lr=0.01, device="cpu",
    )  # fmt: skip
    train.run(cfg, dataset_dir=dataset, out_dir=root / "model")
    evaluate.run(
        EvaluateConfig(min_accuracy=0.0),
        RegistryConfig(uri=str(root / "no-registry")),
        dataset_dir=dataset,
        model_dir=root / "model",
        out_dir=root / "eval",
    )
    return ServedModel(dataset, root / "model", root / "eval")
