"""S3 throughput of ``S3Store`` against the minio SDK's own sequential calls, same files, same run.

``S3Store.upload_tree`` / ``download_tree`` move a tree with a thread pool, hash every file
(sha256 metadata on upload, verified on download) and write downloads via temp + rename.
The baseline is what a script would do with the SDK alone: ``fput_object`` / ``fget_object``
file by file, on a default ``Minio`` client. Two workloads:

(a) a few large files (multipart, bandwidth-bound): the hashing must not cost much;
(b) many small files (a dataset of PNGs, latency-bound): parallel transfers must reach at
    least ``--min-small-ratio`` (default 2x) the baseline's MB/s, up and down, or the script
    exits 1.

Repetitions alternate which side goes first, so background load hits both alike; medians are
reported. By default the script starts its own SeaweedFS on loopback (``imgclf.dev.seaweed``);
``--use-env`` measures the endpoint in AWS_ENDPOINT_URL / MINIO_ENDPOINT instead.

    python benchmarks/s3_throughput.py
    python benchmarks/s3_throughput.py --large-count 2 --small-count 100 --reps 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from minio import Minio

from imgclf.dev import SeaweedServer
from imgclf.storage.s3 import S3Store
from imgclf.storage.s3config import MIB, S3Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--large-count", type=int, default=4, help="large files (default: 4)")
    p.add_argument("--large-mib", type=int, default=32, help="MiB per large file (default: 32)")
    p.add_argument("--small-count", type=int, default=300, help="small files (default: 300)")
    p.add_argument("--small-kib", type=int, default=16, help="KiB per small file (default: 16)")
    p.add_argument("--workers", type=int, default=8, help="S3Store parallel transfers (8)")
    p.add_argument("--part-size-mib", type=int, default=16, help="multipart part size (16)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, median reported (3)")
    p.add_argument(
        "--min-small-ratio",
        type=float,
        default=2.0,
        help="required S3Store/SDK MB/s ratio for small files, up and down (2.0)",
    )
    p.add_argument(
        "--use-env",
        action="store_true",
        help="use the endpoint and keys from the environment instead of a local SeaweedFS",
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return p.parse_args(argv)


@contextlib.contextmanager
def s3_settings(args: argparse.Namespace, workdir: Path) -> Iterator[S3Settings]:
    """Settings of the endpoint to measure: the environment's, or a fresh SeaweedFS."""
    tuning = {"workers": args.workers, "part_size": args.part_size_mib * MIB}
    if args.use_env:
        yield dataclasses.replace(S3Settings.load(), **tuning)
        return
    # volumes of 1 GiB (created sparse): no volume growth in the middle of a measurement
    with SeaweedServer(workdir / "seaweedfs", volume_size_limit_mb=1024) as info:
        print(f"SeaweedFS {info.endpoint} started in {info.startup_seconds:.1f}s", flush=True)
        yield info.settings(**tuning)


def make_files(root: Path, count: int, size: int) -> list[Path]:
    """``count`` files of ``size`` random bytes (incompressible, all distinct)."""
    root.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = root / f"d{i % 10}" / f"file_{i:05d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    name: str,
    files: list[Path],
    root: Path,
    store: S3Store,
    sdk: Minio,
    settings: S3Settings,
    reps: int,
    workdir: Path,
) -> dict[str, object]:
    """Median MB/s of SDK-sequential vs S3Store-parallel transfers of ``files``, both ways."""
    total = sum(p.stat().st_size for p in files)
    rels = [p.relative_to(root).as_posix() for p in files]
    times: dict[str, list[float]] = {
        k: [] for k in ("sdk_up", "store_up", "sdk_down", "store_down")
    }
    for rep in range(reps):
        tag = f"{name}/{rep}"
        sdk_keys = [f"{store.prefix}/sdk/{tag}/{rel}" for rel in rels]
        down = workdir / "down" / tag

        def sdk_up(keys: list[str] = sdk_keys) -> None:
            for path, key in zip(files, keys, strict=True):
                sdk.fput_object(store.bucket, key, str(path), part_size=settings.part_size)

        def sdk_down(keys: list[str] = sdk_keys, dest: Path = down / "sdk") -> None:
            for rel, key in zip(rels, keys, strict=True):
                sdk.fget_object(store.bucket, key, str(dest / rel))

        def store_up(prefix: str = f"store/{tag}") -> None:
            store.upload_tree(root, prefix)

        def store_down(prefix: str = f"store/{tag}", dest: Path = down / "store") -> None:
            store.download_tree(prefix, dest)

        order = [("sdk", sdk_up, sdk_down), ("store", store_up, store_down)]
        if rep % 2:
            order.reverse()
        for side, up, down_fn in order:
            times[f"{side}_up"].append(timed(up))
            times[f"{side}_down"].append(timed(down_fn))
        for side in ("sdk", "store"):
            got = sorted(
                p.relative_to(down / side).as_posix()
                for p in (down / side).rglob("*")
                if p.is_file()
            )
            if got != sorted(rels):
                raise SystemExit(f"{name}: {side} download is incomplete ({len(got)} files)")
        # objects stay until the end: deleting them now would make the server reclaim
        # chunks in the background while the next repetition is being measured
        for side in ("sdk", "store"):
            for p in (down / side).rglob("*"):
                if p.is_file():
                    p.unlink()

    mb = total / 1e6
    result: dict[str, object] = {"files": len(files), "bytes": total}
    for key, values in times.items():
        result[f"{key}_mb_s"] = round(mb / statistics.median(values), 2)
    for way in ("up", "down"):
        sdk_rate = result[f"sdk_{way}_mb_s"]
        store_rate = result[f"store_{way}_mb_s"]
        assert isinstance(sdk_rate, float) and isinstance(store_rate, float)
        result[f"ratio_{way}"] = round(store_rate / sdk_rate, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run both workloads, print MB/s and ratios; exit 1 if small files miss the ratio."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgclf-s3bench-") as tmp:
        workdir = Path(tmp)
        large_root, small_root = workdir / "large", workdir / "small"
        large = make_files(large_root, args.large_count, args.large_mib * MIB)
        small = make_files(small_root, args.small_count, args.small_kib * 1024)
        with s3_settings(args, workdir) as settings:
            bucket = f"imgclf-bench-{uuid.uuid4().hex[:12]}"
            store = S3Store(bucket, "bench", settings)
            store.ensure_bucket()
            sdk = Minio(
                settings.endpoint,
                access_key=settings.access_key,
                secret_key=settings.secret_key,
                session_token=settings.session_token,
                secure=settings.secure,
                region=settings.region,
            )
            try:
                results = {
                    "large": measure(
                        "large", large, large_root, store, sdk, settings, args.reps, workdir
                    ),
                    "small": measure(
                        "small", small, small_root, store, sdk, settings, args.reps, workdir
                    ),
                }
            finally:
                store.delete("", recursive=True)
                sdk.remove_bucket(bucket)

    print(
        f"\nS3 throughput, median of {args.reps} (MB/s = 1e6 bytes/s; S3Store: "
        f"{args.workers} workers, part {args.part_size_mib} MiB; SDK: sequential fput/fget)"
    )
    print(f"{'workload':<28}{'dir':<6}{'SDK MB/s':>10}{'S3Store MB/s':>14}{'ratio':>8}")
    labels = {
        "large": f"{args.large_count} x {args.large_mib} MiB",
        "small": f"{args.small_count} x {args.small_kib} KiB",
    }
    for name, res in results.items():
        for way in ("up", "down"):
            print(
                f"{labels[name]:<28}{way:<6}{res[f'sdk_{way}_mb_s']:>10}"
                f"{res[f'store_{way}_mb_s']:>14}{res[f'ratio_{way}']:>7}x"
            )
    small_ratios = [results["small"]["ratio_up"], results["small"]["ratio_down"]]
    ok = all(isinstance(r, float) and r >= args.min_small_ratio for r in small_ratios)
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict}: small-file ratios {small_ratios} (required >= {args.min_small_ratio}x)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2
            )
            + "\n"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
