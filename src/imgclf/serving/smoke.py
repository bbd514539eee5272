"""Smoke-test a candidate model on the real server before it is promoted.

TFX calls this the InfraValidator: offline metrics say the weights are good, but not that
the *serving* path works (the image, the loader, the preprocessing, the protocol). So the
deploy step starts ``imgclf serve`` on the candidate's model dir, in a subprocess on
loopback exactly as the container runs it, and asks it about a sample of the test split
over HTTP. The candidate passes only when

- the server starts (every file matches its recorded sha256) and reports ready,
- every answer's label equals the evaluate step's prediction for the same file
  (``predictions.csv``), in the v1 and the v2 protocol, and
- the p95 latency of single-image requests is under ``deploy.smoke_p95_ms``.

The report is a dict (into ``deploy.json``) and a Markdown page (``smoke.md``, the KFP
artifact).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from imgclf.config import DeployConfig, ServeConfig, to_dict
from imgclf.contracts import read_eval_predictions
from imgclf.errors import DataError
from imgclf.proc import die_with_parent_preexec

log = logging.getLogger(__name__)

_LISTENING = re.compile(r"Uvicorn running on https?://[^:\s]+:(\d+)")
#: A hang guard for one HTTP call, not a latency bound (the p95 check is the bound).
_REQUEST_TIMEOUT_S = 120.0
_V2_SAMPLES = 4


def _sample(rows: Sequence[dict[str, str]], n: int) -> list[dict[str, str]]:
    """``n`` rows spread evenly over the test split (every class, deterministic)."""
    if len(rows) <= n:
        return list(rows)
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT_S) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    elapsed = time.perf_counter() - started
    try:
        parsed = json.loads(payload or b"{}")
    except ValueError:
        parsed = {"error": payload[:200].decode("utf-8", "replace")}
    return status, parsed, elapsed


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=_REQUEST_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class ServerProcess:
    """``imgclf serve`` on a model dir in a subprocess, on a free port, as a container runs it.

    ``workdir`` receives its params file and log. Call :meth:`wait_listening`, then use
    :attr:`base_url`; :meth:`stop` sends SIGTERM. The smoke test, the tests and the
    benchmark start the server this one way.
    """

    def __init__(self, model_dir: Path, name: str, cfg: ServeConfig, workdir: Path) -> None:
        params = workdir / "params.yaml"
        params.write_text(yaml.safe_dump({"serve": to_dict(cfg)}), encoding="utf-8")
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("wb")
        command = [
            sys.executable, "-m", "imgclf", "--params", str(params), "serve",
            "--model-dir", str(model_dir), "--model", name, "--http_port", "0",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent_preexec(),  # no orphan server when deploy is killed
        )
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` once listening."""
        if self.port is None:
            raise RuntimeError("the server is not listening yet (call wait_listening)")
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 5) -> list[str]:
        """The server's last log lines (why it did not start, for the report)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def wait_listening(self, timeout_s: float) -> str | None:
        """None once the port is known, else why the server is not listening."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
            if match:
                self.port = int(match.group(1))
                return None
            if self.process.poll() is not None:
                return f"the server exited with code {self.process.returncode} before listening"
            time.sleep(0.2)
        return f"the server did not listen within deploy.smoke_timeout_s={timeout_s:g} s"

    def stop(self) -> None:
        """SIGTERM (the server drains), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


ImageReader = Callable[[Iterable[str]], dict[str, bytes]]
"""Manifest paths -> the stored bytes of those found (the dataset's shards, say)."""


def _files_under(dataset_dir: Path) -> ImageReader:
    def read(paths: Iterable[str]) -> dict[str, bytes]:
        return {p: (dataset_dir / p).read_bytes() for p in paths if (dataset_dir / p).is_file()}

    return read


def run_smoke_test(
    model_dir: Path,
    dataset_dir: Path,
    eval_dir: Path,
    *,
    name: str,
    deploy: DeployConfig,
    serve: ServeConfig,
    read_images: ImageReader | None = None,
) -> dict[str, Any]:
    """Start the server on ``model_dir`` and check it against evaluate's predictions.

    The sampled test images are read by manifest path with ``read_images`` (default: the
    files under ``dataset_dir``; deploy passes a shard reader for a dataset without them).

    Returns the report: ``passed``, ``reasons``, ``samples``, ``mismatches`` (file, expected,
    served), ``p50_ms``/``p95_ms``, ``startup_s``, ``v2_checked`` and ``log_tail`` when the
    server failed. A failed smoke test is a result, not an exception: deploy records it.
    DataError when the sampled test images are not in ``dataset_dir`` (a wrong input).
    """
    rows = _sample(read_eval_predictions(eval_dir), deploy.smoke_samples)
    reader = read_images or _files_under(Path(dataset_dir))
    images = reader([row["path"] for row in rows])
    missing = [row["path"] for row in rows if row["path"] not in images]
    if missing:
        raise DataError(
            f"{Path(dataset_dir) / missing[0]}: test image of {eval_dir}/predictions.csv not "
            f"found ({len(missing)} missing); pass the dataset dir the model was evaluated on"
        )
    report: dict[str, Any] = {
        "passed": False,
        "reasons": [],
        "samples": len(rows),
        "mismatches": [],
        "p95_limit_ms": deploy.smoke_p95_ms,
    }
    if not rows:
        report["reasons"].append(f"{eval_dir}: no test predictions to compare with")
        return report
    with tempfile.TemporaryDirectory(prefix="imgclf-smoke-") as tmp:
        started = time.monotonic()
        server = ServerProcess(Path(model_dir), name, serve, Path(tmp))
        try:
            problem = server.wait_listening(deploy.smoke_timeout_s)
            if problem is None:
                problem = wait_ready(server.base_url, name, started + deploy.smoke_timeout_s)
            report["startup_s"] = round(time.monotonic() - started, 2)
            if problem is not None:
                report["reasons"].append(problem)
                report["log_tail"] = server.log_tail()
                return report
            _exchange(server.base_url, name, rows, images, report)
        finally:
            server.stop()
    report["passed"] = not report["reasons"]
    return report


def wait_ready(base: str, name: str, deadline: float) -> str | None:
    """None once the server and model ``name`` report ready (v2 health), else why not."""
    while time.monotonic() < deadline:
        if _get(f"{base}/v2/health/ready") == 200 and _get(f"{base}/v2/models/{name}/ready") == 200:
            return None
        time.sleep(0.2)
    return "the server listened but never reported ready (GET /v2/models/NAME/ready)"


def _exchange(
    base: str,
    name: str,
    rows: list[dict[str, str]],
    images: dict[str, bytes],
    report: dict[str, Any],
) -> None:
    """Ask about every sampled file (v1, a few also v2); fill latencies and mismatches."""
    latencies: list[float] = []
    errors: list[str] = []
    for index, row in enumerate(rows):
        image = base64.b64encode(images[row["path"]]).decode("ascii")
        status, body, elapsed = _post(
            f"{base}/v1/models/{name}:predict", {"instances": [{"image": {"b64": image}}]}
        )
        latencies.append(elapsed * 1000.0)
        if status != 200:
            errors.append(f"{row['path']}: v1 answered {status}: {body.get('error', body)}")
            continue
        served = body["predictions"][0]["label"]
        if served != row["predicted"]:
            report["mismatches"].append(
                {"path": row["path"], "expected": row["predicted"], "served": served, "via": "v1"}
            )
        if index < _V2_SAMPLES:
            request = {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]
            }
            status, body, _ = _post(f"{base}/v2/models/{name}/infer", request)
            if status != 200:
                errors.append(f"{row['path']}: v2 answered {status}: {body.get('error', body)}")
                continue
            label = next(o for o in body["outputs"] if o["name"] == "label")["data"][0]
            if label != row["predicted"]:
                report["mismatches"].append(
                    {
                        "path": row["path"],
                        "expected": row["predicted"],
                        "served": label,
                        "via": "v2",
                    }
                )
    report["v2_checked"] = min(len(rows), _V2_SAMPLES)
    report["p50_ms"] = round(_percentile(latencies, 50), 2)
    report["p95_ms"] = round(_percentile(latencies, 95), 2)
    if errors:
        report["reasons"].append(f"{len(errors)} request(s) failed, first: {errors[0]}")
    if report["mismatches"]:
        first = report["mismatches"][0]
        report["reasons"].append(
            f"{len(report['mismatches'])} answer(s) differ from evaluate's predictions, first: "
            f"{first['path']} expected {first['expected']!r}, served {first['served']!r}"
        )
    if report["p95_ms"] > report["p95_limit_ms"]:
        report["reasons"].append(
            f"p95 latency {report['p95_ms']:.1f} ms is over deploy.smoke_p95_ms="
            f"{report['p95_limit_ms']:g}"
        )


def markdown(report: dict[str, Any], *, name: str) -> str:
    """The report as a Markdown page (the deploy component's KFP artifact, ``smoke.md``)."""
    verdict = "PASSED" if report.get("passed") else "FAILED"
    lines = [
        f"# Smoke test of `{name}`: {verdict}",
        "",
        "| check | value |",
        "|---|---|",
        f"| samples (v1) | {report.get('samples', 0)} |",
        f"| of which also over v2 | {report.get('v2_checked', 0)} |",
        f"| answers differing from evaluate | {len(report.get('mismatches', []))} |",
        f"| p50 latency | {report.get('p50_ms', '-')} ms |",
        f"| p95 latency | {report.get('p95_ms', '-')} ms (limit {report.get('p95_limit_ms')} ms) |",
        f"| server start to ready | {report.get('startup_s', '-')} s |",
    ]
    if report.get("reasons"):
        lines += ["", "## Why it failed", ""] + [f"- {r}" for r in report["reasons"]]
    if report.get("log_tail"):
        lines += ["", "## Server log (last lines)", "", "```", *report["log_tail"], "```"]
    for miss in report.get("mismatches", [])[:20]:
        if miss is report["mismatches"][0]:
            lines += ["", "## Differences", "", "| file | evaluate | served | protocol |"]
            lines += ["|---|---|---|---|"]
        lines.append(
            f"| `{miss['path']}` | {miss['expected']} | {miss['served']} | {miss['via']} |"
        )
    return "\n".join(lines) + "\n"
