"""Datasets at scale: what the pipeline costs as a dataset grows, one measurement per part.

Measurements (``--only`` picks some; all run by default):

ingest
    A deterministic synthetic photo dataset of N JPEGs (256x256, quality 85, ``--classes``
    classes; every 20th carries EXIF orientation 6, every 20th from the 10th an orientation
    tag of 1, the rest none) goes through the real ingest step (``image_format: keep``) for
    each N of ``--sizes``. Printed per N: images/s, output bytes / source bytes (target
    <= 1.05), the fraction of files stored byte-identical to their source (sha256), and
    peak memory. Then the peak at the largest N over the peak at the smallest, PASS when
    <= 1.2 (the issue: 20,000 images within 1.2x of 5,000).

How memory is counted (Linux): each ingest runs in a fresh Python process, so nothing of an
earlier run or of this script is counted. That process reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) and, from a thread that looks every 0.1 s, each
worker's ``VmHWM`` in ``/proc/<pid>/status`` (its peak RSS since it was started). Not
``RUSAGE_CHILDREN``: that is the largest child, not the sum, and a spawned worker's
``ru_maxrss`` includes the parent's whole RSS from the instant between fork and exec, so
it grows with the parent's plan although the worker does not. The reported total is own
peak + the sum of the workers' peaks: an upper bound of the real combined peak, since the
peaks need not coincide and spawned workers share no pages with the parent (a peak reached
in a worker's last 0.1 s is missed). The ratio uses that total.

The script prints numbers from one run; nothing is asserted about time. Exit status 1 when a
check prints FAIL.

    python benchmarks/dataset_scale.py --only ingest
    python benchmarks/dataset_scale.py --only ingest --sizes 500 2000 --workers 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SIDE = 256
QUALITY = 85
ORIENTATION_TAG = 0x0112
ROTATED_EVERY = 20  # i % 20 == 0: orientation 6 (must be converted)
TAGGED_UPRIGHT_AT = 10  # i % 20 == 10: orientation 1 (kept: nothing to rotate)
MAX_BYTES_RATIO = 1.05
MAX_RSS_RATIO = 1.2
_GEN_CHUNK = 250


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--only",
        nargs="+",
        choices=sorted(MEASUREMENTS),
        default=sorted(MEASUREMENTS),
        help="measurements to run (default: all)",
    )
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[5000, 20000], help="images (5000 20000)"
    )
    p.add_argument("--classes", type=int, default=8, help="classes of the dataset (8)")
    p.add_argument("--workers", default="auto", help="ingest.workers (auto)")
    p.add_argument(
        "--workdir", type=Path, help="keep generated data here (default: a temp dir, removed)"
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return p.parse_args(argv)


# -- the synthetic photo dataset ------------------------------------------------------------


def _noise_pool() -> np.ndarray:
    """One fixed field of sensor-like noise; each photo takes its own window of it."""
    rng = np.random.default_rng(0)
    return rng.normal(0, 14, size=(2 * SIDE, 2 * SIDE, 3)).astype(np.float32)


def _photo(i: int, classes: int, noise: np.ndarray) -> np.ndarray:
    """Photo ``i``: a class-coloured gradient with a bright blob and noise, all seeded by i."""
    rng = np.random.default_rng(i)
    label = i % classes
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 29 + 160) % 256])
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / radius**2)[..., None]
    oy, ox = rng.integers(0, SIDE, size=2)
    image = hue * (0.5 + 0.5 * ramp) + 90 * blob + noise[oy : oy + SIDE, ox : ox + SIDE]
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_photos(root: str, start: int, stop: int, classes: int) -> None:
    from PIL import Image

    noise = _noise_pool()
    for i in range(start, stop):
        folder = Path(root) / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        extra = {}
        if i % ROTATED_EVERY in (0, TAGGED_UPRIGHT_AT):
            exif = Image.Exif()
            exif[ORIENTATION_TAG] = 6 if i % ROTATED_EVERY == 0 else 1
            extra["exif"] = exif.tobytes()
        image = Image.fromarray(_photo(i, classes, noise))
        image.save(folder / f"photo{i:06d}.jpg", format="JPEG", quality=QUALITY, **extra)


def make_photo_dataset(root: Path, n: int, classes: int) -> Path:
    """Write photos 0..n-1 under ``root/<class>/`` (skipped when already complete)."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n} {classes}":
        return root
    ranges = [(s, min(s + _GEN_CHUNK, n)) for s in range(0, n, _GEN_CHUNK)]
    with concurrent.futures.ProcessPoolExecutor() as pool:
        jobs = [pool.submit(_write_photos, str(root), a, b, classes) for a, b in ranges]
        for job in jobs:
            job.result()
    done.write_text(f"{n} {classes}")
    return root


# -- ingest ---------------------------------------------------------------------------------


# Run with `python -c`, so spawned workers import no benchmark module (nor numpy) with it.
_INGEST_CHILD = """
import json, os, resource, sys, threading, time
from pathlib import Path
from imgclf.config import IngestConfig
from imgclf.steps import ingest

def status(pid, key):
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

def children():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if int(fh.read().rpartition(")")[2].split()[1]) == os.getpid():
                    found.append(int(pid))
        except OSError:
            pass
    return found

peaks, done = {}, threading.Event()

def watch():  # each worker's VmHWM (its peak RSS since exec), kept from the last look
    while not done.wait(0.1):
        for pid in children():
            try:
                if status(pid, "VmRSS") > 0:  # not a zombie
                    peaks[pid] = max(peaks.get(pid, 0), status(pid, "VmHWM"))
            except (OSError, StopIteration):
                pass

source, out, workers = sys.argv[1:4]
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
started = time.perf_counter()
summary = ingest.run(IngestConfig(source=source, workers=workers), out_dir=Path(out))
seconds = time.perf_counter() - started
done.set()
watcher.join()
n = ingest.resolve_workers(workers, summary["num_images"])
workers_kib = sorted(peaks.values(), reverse=True)[: n if n > 1 else 0]
print(json.dumps({
    "seconds": seconds,
    "workers": n,
    "own_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peaks_mib": [kib / 1024 for kib in workers_kib],
}))
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compare_with_source(source: Path, dataset: Path) -> dict[str, Any]:
    """Output/source bytes and how many stored files are byte-identical to their source."""
    from imgclf.contracts import read_manifest

    by_name = {(p.parent.name, p.stem): p for p in source.glob("*/*.jpg")}
    rows = read_manifest(dataset)
    identical = sum(
        1 for r in rows if r["sha256"] == _sha256(by_name[(r["label"], Path(r["path"]).stem)])
    )
    return {
        "source_bytes": sum(p.stat().st_size for p in by_name.values()),
        "output_bytes": sum(int(r["bytes"]) for r in rows),
        "identical": identical,
        "converted": sum(1 for r in rows if r["stored"] == "converted"),
    }


def ingest_once(source: Path, out: Path, workers: str) -> dict[str, Any]:
    """One ingest of ``source`` in a fresh process, with its memory and output compared."""
    proc = subprocess.run(
        [sys.executable, "-c", _INGEST_CHILD, str(source), str(out), workers],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(_compare_with_source(source, out))
    result["total_peak_mib"] = result["own_peak_mib"] + sum(result["worker_peaks_mib"])
    return result


def measure_ingest(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], bool]:
    """Ingest each of ``args.sizes``; returns the results and whether every check passed."""
    sizes = sorted(args.sizes)
    started = time.perf_counter()
    full = make_photo_dataset(workdir / f"photos-{sizes[-1]}", sizes[-1], args.classes)
    print(f"generated {sizes[-1]} photos in {time.perf_counter() - started:.1f}s", flush=True)
    results: dict[str, Any] = {}
    ok = True
    for n in sizes:
        source = (
            full if n == sizes[-1] else _subset(full, workdir / f"subset-{n}-of-{sizes[-1]}", n)
        )
        r = ingest_once(source, workdir / f"dataset-{n}", args.workers)
        results[str(n)] = r
        ratio = r["output_bytes"] / r["source_bytes"]
        verdict = "PASS" if ratio <= MAX_BYTES_RATIO else "FAIL"
        ok &= verdict == "PASS"
        print(
            f"ingest {n:>6} images, {r['workers']} worker(s): {r['seconds']:.1f}s, "
            f"{n / r['seconds']:.0f} images/s; output/source bytes {ratio:.3f} "
            f"({verdict} <= {MAX_BYTES_RATIO}); byte-identical {r['identical'] / n:.1%}, "
            f"converted {r['converted'] / n:.1%}; peak RSS {r['own_peak_mib']:.0f} MiB own + "
            f"workers [{', '.join(f'{w:.0f}' for w in r['worker_peaks_mib'])}] MiB = "
            f"{r['total_peak_mib']:.0f} MiB",
            flush=True,
        )
    if len(sizes) > 1:
        small, large = results[str(sizes[0])], results[str(sizes[-1])]
        ratio = large["total_peak_mib"] / small["total_peak_mib"]
        own = large["own_peak_mib"] / small["own_peak_mib"]
        verdict = "PASS" if ratio <= MAX_RSS_RATIO else "FAIL"
        ok &= verdict == "PASS"
        print(
            f"peak RSS {sizes[-1]} / {sizes[0]} images: {ratio:.3f} ({verdict} <= "
            f"{MAX_RSS_RATIO}); ingest process alone: {own:.3f}",
            flush=True,
        )
        results["peak_rss_ratio"] = ratio
    return results, ok


def _subset(full: Path, root: Path, n: int) -> Path:
    """The first ``n`` photos of ``full`` as hard links (same bytes, no generation)."""
    if not root.is_dir():
        for path in sorted(full.glob("*/*.jpg")):
            if int(path.stem.removeprefix("photo")) < n:
                (root / path.parent.name).mkdir(parents=True, exist_ok=True)
                os.link(path, root / path.parent.name / path.name)
    return root


MEASUREMENTS: dict[str, Callable[[argparse.Namespace, Path], tuple[dict[str, Any], bool]]] = {
    "ingest": measure_ingest,
}
"""Name -> measurement; each returns (results for --json, whether its checks passed)."""


def main(argv: list[str] | None = None) -> int:
    """Run the chosen measurements; exit 1 when a check fails."""
    args = parse_args(argv)
    results: dict[str, Any] = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="dataset-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.only:
            results[name], passed = MEASUREMENTS[name](args, workdir)
            ok &= passed
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
