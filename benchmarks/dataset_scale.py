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

Ingest also writes the tar shards (``ingest.shards``, the default), so its images/s include
them; the line also gives the shards' bytes over the source's.

publish
    The largest ingested dataset goes to a real SeaweedFS (``imgclf.dev.seaweed``, started
    on loopback for the run) three ways, each with ``manifest.csv`` and ``dataset.json``:
    (a) one object per image with the minio SDK's ``fput_object`` in a loop (what a script
    without our store does), (b) one object per image with ``S3Store.upload_tree`` (parallel
    files), (c) as shards: ``shards/`` + ``shards.json`` with ``S3Store.upload_tree``
    (multipart, parallel). Printed: objects, seconds, MB/s, the ratios; PASS when (c) is
    at least 10x faster than (a) (the issue's acceptance). The shards are then downloaded
    with ``S3Store.download_tree`` and checked with ``verify_shards``.

train
    The train split's data path, images/s of decoded and transformed samples in batches
    (``train`` settings of params.yaml: ``image_size``, ``augment``, loader ``auto``):
    from the ``images/`` tree (``ManifestDataset`` + ``ClassificationPresetTrain`` +
    ``make_loader``, as ``benchmarks/train_throughput.py`` measures it), from the local
    shards and from the shards on SeaweedFS. The shards are read with
    ``imgclf.data.shard_reader`` when it exists, else streamed with :mod:`tarfile` in one
    process in shard order (decode and transform as ``ManifestDataset`` does them): the
    output says which.

The script prints numbers from one run; nothing is asserted about time but the publish
ratio. Exit status 1 when a check prints FAIL.

    python benchmarks/dataset_scale.py                    # everything, 5,000 and 20,000
    python benchmarks/dataset_scale.py --images 2000      # a quick try: 500 and 2,000
    python benchmarks/dataset_scale.py --only ingest --sizes 500 2000 --workers 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
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
MIN_PUBLISH_RATIO = 10.0
BATCH = 64
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
    p.add_argument(
        "--images",
        type=int,
        help="shorthand for --sizes N/4 N (publish and train use the largest size)",
    )
    p.add_argument("--classes", type=int, default=8, help="classes of the dataset (8)")
    p.add_argument("--workers", default="auto", help="ingest.workers (auto)")
    p.add_argument(
        "--workdir", type=Path, help="keep generated data here (default: a temp dir, removed)"
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.images:
        args.sizes = [max(1, args.images // 4), args.images]
    return args


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
    shards = (
        json.loads((dataset / "shards.json").read_text())
        if (dataset / "shards.json").is_file()
        else None
    )
    return {
        "source_bytes": sum(p.stat().st_size for p in by_name.values()),
        "output_bytes": sum(int(r["bytes"]) for r in rows),
        "shard_bytes": sum(
            shard["bytes"]
            for split in (shards or {}).get("splits", {}).values()
            for shard in split["shards"]
        ),
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
            f"({verdict} <= {MAX_BYTES_RATIO}), shards/source "
            f"{r['shard_bytes'] / r['source_bytes']:.3f}; byte-identical {r['identical'] / n:.1%}, "
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


# -- S3: one SeaweedFS for the run ---------------------------------------------------------

_S3: dict[str, Any] = {}
"""The run's server, store and SDK client, started on first use (:func:`s3`)."""


def s3(workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """``{"store": S3Store, "sdk": Minio, "bucket": str}`` on a SeaweedFS started for the run
    (volumes of 1 GiB, created sparse: no volume growth in the middle of a measurement)."""
    if _S3:
        return _S3
    from minio import Minio

    from imgclf.dev import SeaweedServer
    from imgclf.storage.s3 import S3Store

    info = stack.enter_context(SeaweedServer(workdir / "seaweedfs", volume_size_limit_mb=1024))
    print(f"SeaweedFS {info.endpoint} started in {info.startup_seconds:.1f}s", flush=True)
    settings = info.settings()
    bucket = f"dataset-scale-{uuid.uuid4().hex[:8]}"
    store = S3Store(bucket, "", settings)
    store.ensure_bucket()
    sdk = Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region,
    )
    os.environ.update(info.env())  # for open_store("s3://...") in the shard reader
    _S3.update(store=store, sdk=sdk, bucket=bucket, settings=settings)
    return _S3


def largest_dataset(args: argparse.Namespace, workdir: Path) -> Path:
    """The dataset ingested from the largest size (ingested now when --only skipped it)."""
    n = max(args.sizes)
    dataset = workdir / f"dataset-{n}"
    if not (dataset / "shards.json").is_file():
        source = make_photo_dataset(workdir / f"photos-{n}", n, args.classes)
        shutil.rmtree(dataset, ignore_errors=True)
        ingest_once(source, dataset, args.workers)
    return dataset


def _linked_tree(dataset: Path, root: Path, parts: list[str]) -> Path:
    """``root`` holding hard links to the named files and folders of ``dataset``."""
    shutil.rmtree(root, ignore_errors=True)
    for part in parts:
        src = dataset / part
        if src.is_dir():
            shutil.copytree(src, root / part, copy_function=os.link)
        else:
            root.mkdir(parents=True, exist_ok=True)
            os.link(src, root / part)
    return root


def _tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


SHARDED = ["shards", "shards.json", "manifest.csv", "dataset.json"]
PER_IMAGE = ["images", "manifest.csv", "dataset.json"]
SHARDS_PREFIX = "store-shards"


def _shard_hashes(sharded: Path) -> dict[str, str]:
    """Relative path -> sha256 of every shard, as ``shards.json`` records them."""
    from imgclf.data.shards import read_index

    index = read_index(sharded)
    return {s["name"]: s["sha256"] for e in index["splits"].values() for s in e["shards"]}


def measure_publish(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> tuple[dict[str, Any], bool]:
    """Publish the largest dataset per image (SDK loop, our store) and as shards (our store)."""
    from imgclf.data.shards import verify_shards

    dataset = largest_dataset(args, workdir)
    env = s3(workdir, stack)
    store, sdk, bucket = env["store"], env["sdk"], env["bucket"]
    per_image = _linked_tree(dataset, workdir / "publish-per-image", PER_IMAGE)
    sharded = _linked_tree(dataset, workdir / "publish-sharded", SHARDED)

    def sdk_loop() -> None:
        for path in _tree_files(per_image):
            sdk.fput_object(
                bucket, f"sdk-per-image/{path.relative_to(per_image).as_posix()}", str(path)
            )

    ways = {
        "a": ("per image, minio SDK fput_object loop", per_image, sdk_loop),
        "b": (
            f"per image, S3Store.upload_tree ({store.settings.workers} workers)",
            per_image,
            lambda: store.upload_tree(per_image, "store-per-image"),
        ),
        "c": (
            "shards, S3Store.upload_tree (multipart)",
            sharded,
            # shards.json already has every shard's sha256: no hashing read before the upload
            lambda: store.upload_tree(sharded, SHARDS_PREFIX, sha256s=_shard_hashes(sharded)),
        ),
    }
    results: dict[str, Any] = {}
    n = max(args.sizes)
    print(f"publish the {n}-image dataset to SeaweedFS (MB/s = 1e6 bytes/s):", flush=True)
    for way, (label, root, fn) in ways.items():
        files = _tree_files(root)
        size = sum(p.stat().st_size for p in files)
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
        results[way] = {"what": label, "objects": len(files), "bytes": size, "seconds": seconds}
        print(
            f"  ({way}) {label:<44} {len(files):>6} objects {size / 1e6:8.1f} MB "
            f"{seconds:7.1f}s {size / 1e6 / seconds:7.1f} MB/s",
            flush=True,
        )
    _write_marker(store, sharded)
    down = workdir / "download-sharded"
    shutil.rmtree(down, ignore_errors=True)
    started = time.perf_counter()
    store.download_tree(SHARDS_PREFIX, down)
    seconds = time.perf_counter() - started
    (down / "_SUCCESS").unlink()
    verify_shards(down)
    size = results["c"]["bytes"]
    results["c_download_seconds"] = seconds
    print(
        f"      shards back with S3Store.download_tree: {seconds:.1f}s "
        f"{size / 1e6 / seconds:.1f} MB/s, verify_shards OK",
        flush=True,
    )
    shutil.rmtree(down, ignore_errors=True)
    c_vs_a = results["a"]["seconds"] / results["c"]["seconds"]
    c_vs_b = results["b"]["seconds"] / results["c"]["seconds"]
    b_vs_a = results["a"]["seconds"] / results["b"]["seconds"]
    ok = c_vs_a >= MIN_PUBLISH_RATIO
    print(
        f"  shards (c) vs SDK per image (a): {c_vs_a:.1f}x faster "
        f"({'PASS' if ok else 'FAIL'} >= {MIN_PUBLISH_RATIO:g}x); (c) vs (b): {c_vs_b:.1f}x; "
        f"(b) vs (a): {b_vs_a:.1f}x",
        flush=True,
    )
    results.update(c_vs_a=c_vs_a, c_vs_b=c_vs_b, b_vs_a=b_vs_a)
    return results, ok


def _write_marker(store: Any, sharded: Path) -> None:
    """The ``_SUCCESS`` marker a step output carries (untimed: the comparison is the upload),
    so that the shard reader accepts the published dataset."""
    import datetime as dt

    from imgclf.contracts import SUCCESS_FILE, publish_marker
    from imgclf.fsutil import sha256_file

    files = {p.relative_to(sharded).as_posix(): sha256_file(p) for p in _tree_files(sharded)}
    marker = publish_marker(files, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    store.write_bytes(f"{SHARDS_PREFIX}/{SUCCESS_FILE}", json.dumps(marker).encode())


# -- the train data path ----------------------------------------------------------------------


def _shard_samples(fileobj: Any) -> Iterator[tuple[bytes, int, str]]:
    """(image bytes, label, name) of each sample of a shard read as a stream (``r|``)."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        image, name = b"", ""
        for member in tar:
            handle = tar.extractfile(member)
            data = handle.read() if handle else b""
            ext = member.name.rpartition(".")[2]
            if ext == "cls":
                yield image, int(data), name
            elif ext != "json":
                image, name = data, member.name


def _batches(samples: Iterator[tuple[bytes, int, str]], transform: Any) -> Iterator[Any]:
    """Decoded, transformed samples stacked in batches of :data:`BATCH`, as a loader would."""
    import torch

    from imgclf.data.loader import decode_image

    images, labels = [], []
    for data, label, name in samples:
        images.append(decode_image(io.BytesIO(data), transform, name))
        labels.append(label)
        if len(images) == BATCH:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def _rate(batches: Any) -> tuple[int, float]:
    seen = 0
    started = time.perf_counter()
    for images, _ in batches:
        seen += images.shape[0]
    return seen, seen / (time.perf_counter() - started)


def measure_train(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> tuple[dict[str, Any], bool]:
    """The train split's images/s from images/, from local shards and from S3 shards."""
    from imgclf import config
    from imgclf.config import TrainConfig
    from imgclf.data.loader import ManifestDataset, make_loader, resolve_loader_settings
    from imgclf.data.shards import read_index
    from imgclf.training.presets import ClassificationPresetTrain

    dataset = largest_dataset(args, workdir)
    cfg = config.load_section(TrainConfig, "train", Path(__file__).parents[1] / "params.yaml")
    transform = ClassificationPresetTrain(size=cfg.image_size, augment=cfg.augment)
    loader_settings = dict(
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor,
        persistent_workers=cfg.persistent_workers,
        pin_memory=cfg.pin_memory,
        device_type="cpu",
    )
    settings = resolve_loader_settings(**loader_settings)
    manifest_set = ManifestDataset(dataset, "train", transform)
    loader = make_loader(manifest_set, batch_size=BATCH, shuffle=True, **loader_settings)
    results: dict[str, Any] = {}
    seen, results["images_tree"] = _rate(loader)
    del loader
    reader = importlib.util.find_spec("imgclf.data.shard_reader") is not None
    how = (
        "imgclf.data.shard_reader.ShardDataset (shuffled) + make_loader"
        if reader
        else "tarfile stream, one process, shard order (imgclf.data.shard_reader absent)"
    )
    shards = [s["name"] for s in read_index(dataset)["splits"]["train"]["shards"]]

    def local() -> Iterator[tuple[bytes, int, str]]:
        for name in shards:
            with open(dataset / name, "rb") as fh:
                yield from _shard_samples(fh)

    env = s3(workdir, stack)
    store = env["store"]
    if not store.exists(f"{SHARDS_PREFIX}/_SUCCESS"):
        sharded = _linked_tree(dataset, workdir / "publish-sharded", SHARDED)
        store.upload_tree(sharded, SHARDS_PREFIX)
        _write_marker(store, sharded)

    def remote() -> Iterator[tuple[bytes, int, str]]:
        for name in shards:
            response = store.client.get_object(env["bucket"], f"{SHARDS_PREFIX}/{name}")
            try:
                yield from _shard_samples(response)
            finally:
                response.close()
                response.release_conn()

    if reader:
        from imgclf.data.shard_reader import ShardDataset
        from imgclf.data.shard_source import dataset_input

        def shard_loader(root: Path) -> Any:
            shard_set = ShardDataset(
                root, "train", transform, shuffle=True, seed=0, batch_size=BATCH
            )
            return make_loader(shard_set, batch_size=BATCH, shuffle=False, **loader_settings)

        _, results["local_shards"] = _rate(shard_loader(dataset))
        with dataset_input(f"s3://{env['bucket']}/{SHARDS_PREFIX}") as staged:
            _, results["s3_shards"] = _rate(shard_loader(staged))
    else:
        _, results["local_shards"] = _rate(_batches(local(), transform))
        _, results["s3_shards"] = _rate(_batches(remote(), transform))
    results["reader"] = how
    print(
        f"train data path, {seen} train images, image_size {cfg.image_size}, augment "
        f"{cfg.augment}, batch {BATCH}, loader num_workers={settings.num_workers}:",
        flush=True,
    )
    base = results["images_tree"]
    print(f"  images/ tree (ManifestDataset + make_loader): {base:8.0f} images/s", flush=True)
    for key, label in (("local_shards", "local shards"), ("s3_shards", "S3 shards")):
        rate = results[key]
        print(f"  {label:<44} {rate:8.0f} images/s ({rate / base:.2f}x images/)", flush=True)
    print(f"  shards read with: {how}", flush=True)
    return results, True


def _ingest(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> tuple[dict[str, Any], bool]:
    return measure_ingest(args, workdir)


MEASUREMENTS: dict[
    str, Callable[[argparse.Namespace, Path, contextlib.ExitStack], tuple[dict[str, Any], bool]]
] = {"ingest": _ingest, "publish": measure_publish, "train": measure_train}
"""Name -> measurement, run in this order; each returns (results for --json, whether its
checks passed)."""


def main(argv: list[str] | None = None) -> int:
    """Run the chosen measurements; exit 1 when a check fails."""
    args = parse_args(argv)
    results: dict[str, Any] = {}
    ok = True
    with (
        tempfile.TemporaryDirectory(prefix="dataset-scale-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in MEASUREMENTS:
            if name in args.only:
                results[name], passed = MEASUREMENTS[name](args, workdir, stack)
                ok &= passed
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
