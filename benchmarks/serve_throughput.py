"""Images/s and latency of ``imgclf serve`` against a plain in-process ``model(batch)`` loop.

The server wraps the forward pass in HTTP, JSON, base64, image decoding, the eval transform
and a micro-batcher that stacks concurrent requests into one forward pass. This script
measures, in one run and on the same test images, what that costs:

- ``plain batched``: ``forward_logits`` over the already preprocessed tensors, in batches of
  the server's ``max_batch_size`` (32): the most images/s the model gives on this machine;
- ``plain single``: the same, one image per call: the least latency one image can have;
- ``server``: ``imgclf serve`` as a subprocess, driven by 1 and 32 concurrent clients; each
  request carries one base64 PNG (KServe v1), as a real client sends it. Every answer is
  checked (HTTP 200, and the label the plain loop predicts for that image); errors are
  counted and must be 0.

Two targets: at the most clients, server images/s >= 0.7 x plain batched images/s; at one
client, server p50 latency <= plain single p50 + 10 ms. ``--check`` exits 1 when one fails.

Fairness. Phases alternate: each of ``--rounds`` rounds runs every phase for its share of
``--seconds`` (after ``--warmup`` s unmeasured), starting one phase later each round, so
load from other processes on a shared machine hits all phases alike; the figures are
summed over the rounds. The torch intra-op thread count (``--threads``, default: PyTorch's
default here, one per core) is set in this process and, through ``OMP_NUM_THREADS``, in the
server. Request bodies are encoded before the clock starts.

The clients share the machine with the server, so they must cost it little: asyncio tasks
on one ``aiohttp`` session (one keep-alive connection per client) in this process. Measured
on 2 cores against 32 threads with their own persistent ``http.client.HTTPConnection``
(``--client threads``): on this server both cost about 0.1 core and got the same images/s;
on the server's HTTP path alone (forward stubbed out, ~500 requests/s) the server answered
7-16% more requests/s with aiohttp, and spent less CPU on each. Hence aiohttp.

Where the time goes: the server's CPU seconds come from ``/proc`` (Linux), its batch sizes
and forward seconds from its ``/metrics``, and the last line gives the in-process cost of
each step the server takes before the forward. Compare only within one run.

What to expect (2 slow shared cores, one run each, 2026-12-02). The request path (HTTP,
FastAPI routing and KServe's data plane, JSON, metrics: about 2-3.5 ms of server CPU per
request) is a fixed cost per request, so the ratio depends on what one forward costs:

- ``--image-size 224`` (a ResNet-18 at the ImageNet size of the book's transfer learning,
  ~17 ms per image here): server 57.6 images/s at 32 clients vs 46.4 plain batched (1.24x;
  batches of 32 are slower per image than the server's ~16 on this CPU), p50 22.8 ms at one
  client vs 16.1 + 10 ms: both targets met.
- default (the demo's 32 px digits model, 0.5 ms per image in a batch): 397 vs 1978
  images/s (0.20x), p50 13.2 ms vs 6.4 + 10 ms: the latency target is met, the throughput
  one is not and cannot be with one image per request: the request path alone is 5-7x the
  forward. Clients that send several images per request (``instances`` holds up to
  ``serve.max_images_per_request``) divide that cost.

    python benchmarks/serve_throughput.py --seconds 8
    python benchmarks/serve_throughput.py --image-size 224 --seconds 12
    python benchmarks/serve_throughput.py --model-dir out/model --clients 1,8,32 --check
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import functools
import http.client
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import torch

from imgclf.config import ServeConfig
from imgclf.contracts import IMAGES_DIR
from imgclf.serving.images import b64decode, decode_image
from imgclf.serving.smoke import ServerProcess, wait_ready
from imgclf.training import engine
from imgclf.training.models import load_model_dir
from imgclf.training.presets import ClassificationPresetEval

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "digits"
#: ``imgclf train`` overrides for a tiny model (~15 s on two CPU cores).
TINY_TRAIN = (
    "epochs=1",
    "max_steps_per_epoch=20",
    "min_steps=0",
    "lr=0.003",
    "backbone_lr=0.003",
)
TINY_TRAIN_LARGE = ("epochs=1", "max_steps_per_epoch=3", "batch_size=8", "augment=none")
THROUGHPUT_TARGET = 0.7
LATENCY_SLACK_MS = 10.0
MAX_PIXELS = 4096 * 4096
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 30.0


@dataclasses.dataclass
class Sample:
    """One test image: the request body a client sends, its tensor, the expected label."""

    path: Path
    png: bytes
    body: bytes
    tensor: torch.Tensor
    label: str = ""


@dataclasses.dataclass
class Phase:
    """One measured phase, summed over the rounds."""

    name: str
    clients: int | None = None
    batch: int | None = None
    images: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    error_examples: list[str] = dataclasses.field(default_factory=list)
    #: server and client CPU seconds and the server's /metrics counters, during the windows
    counters: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.clients is None:
            return self.name
        return f"{self.name}, {self.clients} client{'s' if self.clients > 1 else ''}"

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: int) -> float:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else float("nan")
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[q - 1]

    def server_stats(self) -> dict[str, float]:
        """Per second and per image figures of the server (empty for the plain loops)."""
        if not self.counters:
            return {}
        c, nan = self.counters, float("nan")
        images = c["batched_images"] or nan
        return {
            "server_cpu_per_s": c["server_cpu_s"] / self.seconds,
            "client_cpu_per_s": c["client_cpu_s"] / self.seconds,
            "mean_batch": images / (c["batches"] or nan),
            "forward_ms_per_image": c["forward_s"] * 1000.0 / images,
            "server_cpu_ms_per_image": c["server_cpu_s"] * 1000.0 / images,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clients": self.clients,
            "batch": self.batch,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p95_ms": round(self.percentile_ms(95), 3),
            "errors": self.errors,
            "error_examples": self.error_examples,
            "server": {k: round(v, 4) for k, v in self.server_stats().items()},
        }


# the model in this process ------------------------------------------------------------


class Forward:
    """``forward_logits`` exactly as the server calls it, on one device."""

    def __init__(self, model_dir: Path, device: torch.device) -> None:
        model, self.meta = load_model_dir(model_dir)
        self.device = device
        self.amp_dtype, _ = engine.amp_settings(device)
        self.model = engine.prepare_model(model, device)
        self.classes = [str(c) for c in self.meta["classes"]]
        self.transform = ClassificationPresetEval(
            size=tuple(self.meta["input_size"][1:]), mean=self.meta["mean"], std=self.meta["std"]
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            # .cpu() waits for the device, as the server's answer does
            return engine.forward_logits(self.model, images, self.device, self.amp_dtype).cpu()


def load_samples(dataset: Path, forward: Forward, batch_size: int) -> list[Sample]:
    """Every test image, decoded as the server decodes it, labelled by the plain forward."""
    paths = sorted((dataset / IMAGES_DIR / "test").glob("*/*.png"))
    if not paths:
        raise SystemExit(f"{dataset / IMAGES_DIR / 'test'}: no PNG images (run ingest first)")
    samples = []
    for path in paths:
        png = path.read_bytes()
        body = {"instances": [{"image": {"b64": base64.b64encode(png).decode("ascii")}}]}
        image = decode_image(png, max_pixels=MAX_PIXELS, where=str(path))
        samples.append(Sample(path, png, json.dumps(body).encode(), forward.transform(image)))
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        indices = forward(torch.stack([s.tensor for s in chunk])).argmax(dim=1).tolist()
        for sample, index in zip(chunk, indices, strict=True):
            sample.label = forward.classes[index]
    return samples


def time_plain(
    forward: Forward, batches: list[torch.Tensor], phase: Phase, warmup: float, seconds: float
) -> None:
    """Call ``forward`` on ``batches`` in turn, ``warmup`` s unmeasured, then ``seconds``."""
    cycle = itertools.cycle(batches)
    end_warmup = time.perf_counter() + warmup
    while time.perf_counter() < end_warmup:
        forward(next(cycle))
    started = time.perf_counter()
    while (now := time.perf_counter()) - started < seconds:
        batch = next(cycle)
        forward(batch)
        phase.latencies_ms.append((time.perf_counter() - now) * 1000.0)
        phase.images += len(batch)
    phase.seconds += time.perf_counter() - started


def batches_of(samples: list[Sample], size: int) -> list[torch.Tensor]:
    """Full batches of ``size`` over the samples (wrapping round), as tensors."""
    count = max(1, len(samples) // size)
    tensors = itertools.cycle(s.tensor for s in samples)
    return [torch.stack([next(tensors) for _ in range(size)]) for _ in range(count)]


def step_costs_ms(samples: list[Sample], forward: Forward) -> dict[str, float]:
    """Median in-process ms per image of each step the server takes before the forward."""
    texts = [json.loads(s.body)["instances"][0]["image"]["b64"] for s in samples]
    images = [decode_image(s.png, max_pixels=MAX_PIXELS, where="") for s in samples]
    steps: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
        "json_parse": (json.loads, [s.body for s in samples]),
        "base64": (functools.partial(b64decode, where=""), texts),
        "png_decode": (
            functools.partial(decode_image, max_pixels=MAX_PIXELS, where=""),
            [s.png for s in samples],
        ),
        "transform": (forward.transform, images),
    }
    costs = {}
    for name, (step, inputs) in steps.items():
        times = []
        for item in inputs:
            started = time.perf_counter()
            step(item)
            times.append((time.perf_counter() - started) * 1000.0)
        costs[name] = statistics.median(times)
    return costs


# the server process -------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    """A running ``imgclf serve`` subprocess."""

    process: subprocess.Popen[bytes]
    url: str

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        """Batch count, batched images and forward seconds from the server's /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=REQUEST_TIMEOUT_S) as resp:
            text = resp.read().decode()
        wanted = {
            "imgclf_serve_batch_images_count": "batches",
            "imgclf_serve_batch_images_sum": "batched_images",
            "imgclf_serve_forward_seconds_sum": "forward_s",
        }
        found = dict.fromkeys(wanted.values(), 0.0)
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            if name in wanted:
                found[wanted[name]] += float(rest.rsplit(" ", 1)[1])
        return found

    def snapshot(self) -> dict[str, float]:
        """Server and client CPU seconds and the server's counters, now."""
        return {
            "server_cpu_s": self.cpu_seconds(),
            "client_cpu_s": time.process_time(),
            **self.metrics(),
        }


@contextmanager
def running_server(model_dir: Path, args: argparse.Namespace) -> Iterator[Server]:
    """Start ``imgclf serve`` the way the deploy smoke test does (its ``ServerProcess``: a
    free port, a log file), wait until ready, SIGTERM it on exit."""
    cfg = ServeConfig(
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        device=args.device,
    )
    # the server's torch threads, as set in this process (it inherits the environment)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="imgclf-serve-bench-") as work:
        proc = ServerProcess(model_dir, MODEL_NAME, cfg, Path(work))
        try:
            started = time.monotonic()
            problem = proc.wait_listening(START_TIMEOUT_S) or wait_ready(
                proc.base_url, MODEL_NAME, started + START_TIMEOUT_S
            )
            if problem is not None:
                tail = "\n".join(proc.log_tail(20))
                raise SystemExit(f"imgclf serve did not start: {problem}\n{tail}")
            server = Server(proc.process, proc.base_url)
            print(f"server pid {proc.process.pid} ready at {server.url}", flush=True)
            yield server
        finally:
            proc.stop()


# the clients --------------------------------------------------------------------------


class Tally:
    """Answers of one server phase: latencies of those finished inside the window, errors."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.window_start = time.perf_counter() + warmup
        self.window_end = self.window_start + seconds
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.error_examples: list[str] = []
        self.lock = threading.Lock()

    def open(self) -> bool:
        return time.perf_counter() < self.window_end

    def record(self, sample: Sample, sent: float, status: int, body: bytes) -> None:
        done = time.perf_counter()
        problem = check_answer(sample, status, body)
        if problem is not None:
            self.error(problem)
        elif self.window_start <= done <= self.window_end:
            with self.lock:
                self.latencies_ms.append((done - sent) * 1000.0)

    def error(self, problem: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.error_examples) < 5:
                self.error_examples.append(problem)


def check_answer(sample: Sample, status: int, body: bytes) -> str | None:
    """None when the answer is 200 with the expected label, else what is wrong."""
    if status != 200:
        return f"{sample.path.name}: HTTP {status}: {body[:200]!r}"
    try:
        label = json.loads(body)["predictions"][0]["label"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"{sample.path.name}: unexpected answer {body[:200]!r}"
    if label != sample.label:
        return f"{sample.path.name}: label {label!r}, plain forward says {sample.label!r}"
    return None


async def _aiohttp_phase(
    server: Server, samples: list[Sample], clients: int, tally: Tally
) -> tuple[dict[str, float], dict[str, float]]:
    url = f"{server.url}/v1/models/{MODEL_NAME}:predict"
    headers = {"Content-Type": "application/json"}
    order = itertools.cycle(samples)
    loop = asyncio.get_running_loop()

    async def client(session: aiohttp.ClientSession) -> None:
        while tally.open():
            sample = next(order)
            sent = time.perf_counter()
            try:
                async with session.post(url, data=sample.body, headers=headers) as resp:
                    tally.record(sample, sent, resp.status, await resp.read())
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.error(f"{sample.path.name}: {exc!r}")

    async def window() -> tuple[dict[str, float], dict[str, float]]:
        await asyncio.sleep(tally.window_start - time.perf_counter())
        before = await loop.run_in_executor(None, server.snapshot)
        await asyncio.sleep(tally.window_end - time.perf_counter())
        return before, await loop.run_in_executor(None, server.snapshot)

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        *_, snapshots = await asyncio.gather(*(client(session) for _ in range(clients)), window())
    return snapshots


def _threads_phase(
    server: Server, samples: list[Sample], clients: int, tally: Tally
) -> tuple[dict[str, float], dict[str, float]]:
    host_port = server.url.removeprefix("http://")
    path = f"/v1/models/{MODEL_NAME}:predict"
    headers = {"Content-Type": "application/json"}
    order = itertools.cycle(samples)
    order_lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(host_port, timeout=REQUEST_TIMEOUT_S)
        while tally.open():
            with order_lock:
                sample = next(order)
            sent = time.perf_counter()
            try:
                conn.request("POST", path, sample.body, headers)
                resp = conn.getresponse()
                tally.record(sample, sent, resp.status, resp.read())
            except (OSError, http.client.HTTPException) as exc:
                tally.error(f"{sample.path.name}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection(host_port, timeout=REQUEST_TIMEOUT_S)
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, tally.window_start - time.perf_counter()))
    before = server.snapshot()
    time.sleep(max(0.0, tally.window_end - time.perf_counter()))
    after = server.snapshot()
    for thread in threads:
        thread.join()
    return before, after


def time_server(
    server: Server,
    samples: list[Sample],
    phase: Phase,
    client: str,
    warmup: float,
    seconds: float,
) -> None:
    """``phase.clients`` concurrent clients, one image per request, warmup + seconds."""
    assert phase.clients is not None
    tally = Tally(warmup, seconds)
    if client == "aiohttp":
        before, after = asyncio.run(_aiohttp_phase(server, samples, phase.clients, tally))
    else:
        before, after = _threads_phase(server, samples, phase.clients, tally)
    phase.images += len(tally.latencies_ms)
    phase.seconds += seconds
    phase.latencies_ms += tally.latencies_ms
    phase.errors += tally.errors
    phase.error_examples += tally.error_examples[: 5 - len(phase.error_examples)]
    for key in before:
        phase.counters[key] = phase.counters.get(key, 0.0) + after[key] - before[key]


# the report ---------------------------------------------------------------------------


def targets(phases: list[Phase]) -> dict[str, dict[str, Any]]:
    """The two targets, each with its measured value, its bound and whether it holds."""
    batched, single, *served = phases
    busiest = max(served, key=lambda p: p.clients or 0)
    ratio = busiest.images_per_s / batched.images_per_s
    result: dict[str, dict[str, Any]] = {
        "throughput": {
            "what": f"server images/s at {busiest.clients} clients / plain batched images/s",
            "value": round(ratio, 3),
            "bound": f">= {THROUGHPUT_TARGET}",
            "passed": ratio >= THROUGHPUT_TARGET and busiest.errors == 0,
        }
    }
    alone = next((p for p in served if p.clients == 1), None)
    if alone is not None:
        limit = single.percentile_ms(50) + LATENCY_SLACK_MS
        result["latency"] = {
            "what": f"server p50 ms at 1 client vs plain single p50 + {LATENCY_SLACK_MS:g} ms",
            "value": round(alone.percentile_ms(50), 3),
            "bound": f"<= {limit:.3f}",
            "passed": alone.percentile_ms(50) <= limit and alone.errors == 0,
        }
    return result


def print_report(
    phases: list[Phase], costs: dict[str, float], checks: dict[str, dict[str, Any]]
) -> None:
    """The table, the targets with PASS/FAIL, the errors, the cost of each decoding step."""
    header = (
        f"{'phase':<22} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6} "
        f"{'batch':>6} {'fwd ms/img':>10} {'srv cpu ms/img':>14} {'srv cpu/s':>9} "
        f"{'cli cpu/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for phase in phases:
        stats = phase.server_stats()
        if stats:
            extra = (
                f"{stats['mean_batch']:>6.1f} {stats['forward_ms_per_image']:>10.3f} "
                f"{stats['server_cpu_ms_per_image']:>14.3f} {stats['server_cpu_per_s']:>9.2f} "
                f"{stats['client_cpu_per_s']:>9.2f}"
            )
        else:
            size = phase.batch or 1
            extra = f"{size:>6} {phase.percentile_ms(50) / size:>10.3f}"
        print(
            f"{phase.label:<22} {phase.images_per_s:>9.1f} {phase.percentile_ms(50):>8.2f} "
            f"{phase.percentile_ms(95):>8.2f} {phase.errors:>6} {extra}"
        )
    print(
        "(plain: fwd ms/img = p50 of one call / batch; server: batch and forward time from "
        "its /metrics, CPU from /proc)"
    )
    print()
    for name, check in checks.items():
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"{verdict} {name}: {check['what']} = {check['value']} (target {check['bound']})")
    for phase in phases:
        for example in phase.error_examples:
            print(f"  error ({phase.label}): {example}")
    steps = ", ".join(f"{k} {v:.3f}" for k, v in costs.items())
    print(f"in-process ms per image before the forward (median, one thread): {steps}")


# main ---------------------------------------------------------------------------------


def train_tiny_model(dataset: Path, out: Path, image_size: int) -> None:
    """``imgclf train`` with :data:`TINY_TRAIN` at ``image_size`` px into ``out``.

    At 224 px (the ImageNet size of the book's transfer learning) a few steps of batch 8
    keep the training short; the benchmark needs a real model dir, not an accurate one.
    """
    command = [sys.executable, "-m", "imgclf", "train", "--dataset", str(dataset)]
    command += ["--out", str(out), "--set", f"image_size={image_size}"]
    settings = TINY_TRAIN if image_size <= 64 else (*TINY_TRAIN_LARGE, *TINY_TRAIN[2:])
    for setting in settings:
        command += ["--set", setting]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"imgclf train failed:\n{(done.stdout + done.stderr)[-3000:]}")
    print(f"trained a tiny model into {out} in {time.perf_counter() - started:.1f}s", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model-dir",
        type=Path,
        help="model dir to serve (default: train a tiny one into a temp dir from --dataset)",
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=Path("out/dataset"),
        help="dataset dir; its images/test are the requests (default: out/dataset)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="input size of the model trained when no --model-dir is given: 32 (the demo's "
        "digits model) or e.g. 224 (a ResNet at ImageNet size) (32)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="measured s per phase (10)")
    p.add_argument(
        "--rounds", type=int, default=3, help="split each phase's seconds over rounds (3)"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured s before each slice (1.0)")
    p.add_argument("--clients", default="1,32", help="concurrent clients per phase (1,32)")
    p.add_argument(
        "--client",
        choices=("aiohttp", "threads"),
        default="aiohttp",
        help="asyncio + aiohttp in one process, or threads with http.client (aiohttp)",
    )
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="server max_batch_size = plain batch (32)"
    )
    p.add_argument("--max-batch-wait-ms", type=float, default=2.0, help="server wait (2.0)")
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"torch intra-op threads, here and in the server ({torch.get_num_threads()})",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (cpu)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    except ValueError:
        p.error(f"--clients: expected comma-separated integers, got {args.clients!r}")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients: give at least one count, each >= 1")
    if args.seconds <= 0 or args.rounds < 1 or args.warmup < 0:
        p.error("--seconds must be > 0, --rounds >= 1, --warmup >= 0")
    return args


def run(args: argparse.Namespace, model_dir: Path) -> tuple[list[Phase], dict[str, float]]:
    """Each round runs every phase once, starting one later each round; sums over rounds."""
    forward = Forward(model_dir, engine.select_device(args.device))
    samples = load_samples(args.dataset.resolve(), forward, args.max_batch_size)
    print(
        f"{len(samples)} test images, {forward.meta.get('architecture')} "
        f"{'x'.join(map(str, forward.meta['input_size']))}, device={args.device}, "
        f"torch threads={torch.get_num_threads()} (here and in the server), "
        f"client={args.client}, {args.rounds} rounds of {args.warmup:g}s warm-up + "
        f"{args.seconds / args.rounds:.3g}s per phase",
        flush=True,
    )
    size = args.max_batch_size
    batched = Phase("plain batched", batch=size)
    single = Phase("plain single", batch=1)
    served = [Phase("server", clients=c) for c in args.clients]
    slice_s = args.seconds / args.rounds
    batches, singles = batches_of(samples, size), batches_of(samples, 1)
    costs = step_costs_ms(samples, forward)
    with running_server(model_dir.resolve(), args) as server:
        steps = [
            functools.partial(time_plain, forward, batches, batched, args.warmup, slice_s),
            functools.partial(time_plain, forward, singles, single, args.warmup, slice_s),
            *(
                functools.partial(
                    time_server, server, samples, phase, args.client, args.warmup, slice_s
                )
                for phase in served
            ),
        ]
        for r in range(args.rounds):
            for step in steps[r % len(steps) :] + steps[: r % len(steps)]:
                step()
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    return [batched, single, *served], costs


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and targets, optionally write JSON; 1 on FAIL with --check."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = None
    try:
        model_dir = args.model_dir
        if model_dir is None:
            work = Path(tempfile.mkdtemp(prefix="imgclf-serve-bench-"))
            model_dir = work / "model"
            train_tiny_model(args.dataset.resolve(), model_dir, args.image_size)
        phases, costs = run(args, model_dir)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    checks = targets(phases)
    print()
    print_report(phases, costs, checks)
    if args.json:
        settings = {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("json", "check")
        }
        results = {
            "settings": settings,
            "phases": [p.summary() for p in phases],
            "step_ms_per_image": costs,
            "targets": checks,
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    failed = not all(c["passed"] for c in checks.values())
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
