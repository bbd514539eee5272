"""INGEST step: turn a source of labelled images into a normalised, split, hashed dataset dir.

Output (``docs/CONTRACTS.md``, "Dataset dir")::

    images/<split>/<class>/<file>   the images (and undecodable originals, see below)
    manifest.csv, dataset.json      one row per file, and the summary with the dataset hash
                                    (both written by :func:`imgclf.contracts.write_dataset`)
    shards/, shards.json            each split as tar shards (``ingest.shards``, see
                                    :mod:`imgclf.data.shards`)
    config.json                     the resolved IngestConfig (secrets redacted)

``ingest.write_images`` decides whether ``images/`` stays: ``true``, ``false``, or ``auto``
(the default): kept up to ``ingest.images_max`` images (200,000), dropped above, where a
tree of that many files costs more to copy, list and upload than the shards holding the
same bytes, and the people who browse images/ look at samples, not at all of them. Without
images/ the manifest's paths still name where each image would be, and the shards' json
members carry that path. The images are still written to images/ first (inside the temp
output dir), sharded in manifest order, and the tree then deleted: the shards need each
split in manifest (path) order, which the workers' write order is not, so this costs a
transient second copy on disk, never memory. Undecodable originals live only in images/:
without it the manifest's ``error`` rows are all that is left of them.

What each file becomes is decided per file by :mod:`imgclf.data.imagefile`: with
``image_format: keep`` (the default) a JPEG, PNG or WebP that decodes, has mode ``L`` or
``RGB`` and needs no EXIF rotation is stored byte for byte, anything else is converted and
the manifest's ``stored``/``conversion`` columns say so and why; ``image_format: png``
re-encodes every image as PNG. The file keeps its original stem, reduced to
``[A-Za-z0-9._-]`` and de-duplicated within its folder with ``_1``, ``_2``, ... suffixes.

Decoding, checking and hashing run in ``ingest.workers`` processes (``auto``: one per
core). Memory stays bounded: the plan holds one small record per file and each written file
leaves one manifest row, but no image's bytes are held; workers read and write files by
path, and only a bounded window of work is in flight. Workers are spawned, so a script that
calls :func:`run` needs the usual ``if __name__ == "__main__":`` guard.

Files that cannot be decoded are not dropped: their original bytes are copied under their
original (sanitised) name and the manifest row says why in ``error``. Dropping them here
would hide the problem; the validate step decides whether it blocks the pipeline.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from imgclf.config import AUTO, IngestConfig, SplitRatios, parse_flag, parse_write_images, to_dict
from imgclf.contracts import IMAGES_DIR, SPLITS, ManifestRow, image_path, write_dataset
from imgclf.data.imagefile import (
    CONVERTED,
    IMAGE_FORMATS,
    KEEP,
    StoredFile,
    StoreTask,
    store_images,
)
from imgclf.data.layout import RawImage, find_images
from imgclf.data.shards import write_shards
from imgclf.data.sources import SourceOptions, open_source, redact_uri
from imgclf.errors import ConfigError
from imgclf.fsutil import atomic_dir, write_json

log = logging.getLogger(__name__)

_RATIO_TOLERANCE = 1e-6
_MAX_STEM = 100
_SECRET_KEY = re.compile(r"secret|password|token|access_key|credential", re.IGNORECASE)
# Work in flight: tasks go to workers in chunks (one message per image would cost as much as
# decoding a small one), and each worker has a few chunks queued so it never waits.
_CHUNK = 16
_WINDOW_PER_WORKER = 4
_IMAGES_PER_AUTO_WORKER = 256


def run(cfg: IngestConfig, *, out_dir: Path) -> dict[str, Any]:
    """Ingest ``cfg.source`` into ``out_dir`` and return the ``dataset.json`` content.

    The whole dir is written through :func:`~imgclf.fsutil.atomic_dir`: downloads and
    extracted archives live in a hidden folder inside the temp dir (never in the working
    directory) and are removed before it replaces ``out_dir``.
    """
    check_config(cfg)
    image_format = cfg.image_format.lower()
    source = open_source(cfg.source, SourceOptions.from_config(cfg))
    with atomic_dir(out_dir) as tmp:
        work = tmp / ".source"
        root = source.materialize(work)
        plan = assign_splits(
            find_images(root, label=source.label, allow_external_links=cfg.allow_external_links),
            cfg.split,
            cfg.seed,
        )
        # written by split, class and path; reversed, since _drain takes from the end, so
        # each entry is released as its image is written
        order = {split: i for i, split in enumerate(SPLITS)}
        plan.sort(key=lambda p: (order[p[1]], p[0].label, p[0].rel), reverse=True)
        total = len(plan)
        rows = write_images(
            _drain(plan),
            tmp,
            total=total,
            image_format=image_format,
            workers=resolve_workers(cfg.workers, total),
        )
        shutil.rmtree(work, ignore_errors=True)
        summary = write_dataset(
            tmp,
            rows,
            source=source.label,
            image_format=image_format,
            seed=cfg.seed,
            split=dataclasses.asdict(cfg.split),
        )
        if parse_flag(cfg.shards):
            write_shards(tmp, shard_bytes=cfg.shard_bytes, seed=cfg.seed)
        if not keeps_images(cfg, summary["num_images"]):
            log.info("dropping images/ (ingest.write_images: %s)", cfg.write_images)
            shutil.rmtree(tmp / IMAGES_DIR, ignore_errors=True)
        write_json(tmp / "config.json", _config_record(cfg))
    log.info(
        "ingested %d images (%d errors, %d classes) from %s into %s",
        summary["num_images"],
        summary["num_errors"],
        len(summary["classes"]),
        source.label,
        out_dir,
    )
    return summary


def check_config(cfg: IngestConfig) -> None:
    """Reject settings that would only fail (or silently mislead) halfway through."""
    ratios = (cfg.split.train, cfg.split.val, cfg.split.test)
    if any(not math.isfinite(r) or r < 0 for r in ratios) or not math.isclose(
        sum(ratios), 1.0, abs_tol=_RATIO_TOLERANCE
    ):
        raise ConfigError(
            "ingest.split: ratios must be >= 0 and sum to 1, got "
            f"train={cfg.split.train} val={cfg.split.val} test={cfg.split.test}"
        )
    if cfg.image_format.lower() not in IMAGE_FORMATS:
        raise ConfigError(
            f"ingest.image_format: {cfg.image_format!r} is not supported; "
            f"use one of {', '.join(IMAGE_FORMATS)}"
        )
    if isinstance(cfg.image_size, bool) or cfg.image_size < 1:
        raise ConfigError(f"ingest.image_size: expected a positive integer, got {cfg.image_size}")
    for name in ("max_download_bytes", "max_extracted_bytes", "max_archive_members"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"ingest.{name}: expected a positive integer, got {value!r}")
    ratio = cfg.max_compression_ratio
    if isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 0:
        raise ConfigError(f"ingest.max_compression_ratio: expected a number > 0, got {ratio!r}")


def keeps_images(cfg: IngestConfig, n_images: int) -> bool:
    """Whether the dataset dir keeps its ``images/`` tree (``ingest.write_images``): always
    without shards, since they would be the only copy; with ``auto`` up to ``images_max``."""
    setting = parse_write_images(cfg.write_images)
    if not parse_flag(cfg.shards):
        return True
    if setting is None:
        return n_images <= cfg.images_max
    return setting


def split_counts(n: int, ratios: SplitRatios) -> tuple[int, int, int]:
    """How many of ``n`` images of one class go to train, val and test.

    Largest-remainder rounding keeps the total exact; then, if train has a non-zero ratio
    but got nothing (tiny classes), one image moves to train from the bigger of val/test,
    because a class missing from train cannot be learned at all.
    """
    weights = (ratios.train, ratios.val, ratios.test)
    quotas = [n * w for w in weights]
    counts = [math.floor(q + 1e-9) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n > 0 and ratios.train > 0 and counts[0] == 0:
        donor = 1 if counts[1] >= counts[2] else 2
        counts[donor] -= 1
        counts[0] += 1
    return counts[0], counts[1], counts[2]


def assign_splits(
    images: Sequence[RawImage], ratios: SplitRatios, seed: int
) -> list[tuple[RawImage, str]]:
    """Give each image a split: the source's own when it was already split, else a
    seeded stratified one.

    Each class is shuffled by its own generator seeded with ``(seed, class)`` after sorting
    by path, so the split depends only on the seed and the files, not on the filesystem's
    listing order, and adding a class does not reshuffle the others.
    """
    if images and all(image.split is not None for image in images):
        return [(image, str(image.split)) for image in images]
    by_class: dict[str, list[RawImage]] = {}
    for image in sorted(images, key=lambda im: im.rel):
        by_class.setdefault(image.label, []).append(image)
    plan: list[tuple[RawImage, str]] = []
    for label in sorted(by_class):
        members = by_class[label]
        random.Random(f"{seed}/{label}").shuffle(members)
        n_train, n_val, _ = split_counts(len(members), ratios)
        for i, image in enumerate(members):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            plan.append((image, split))
    return plan


def resolve_workers(setting: int | str, n_images: int) -> int:
    """How many processes decode: ``ingest.workers``, never more than there are images.

    ``auto`` is one per core this process may run on (``sched_getaffinity``: a container's
    CPU set, not a Kubernetes CPU limit, which it cannot see), but at most one per
    ``_IMAGES_PER_AUTO_WORKER`` images: starting a worker took ~0.4 s (2 cores, spawn and
    PIL import), the time of ~100 small images, so a small dataset is done in-process.
    """
    if isinstance(setting, str) and setting.strip().lower() == AUTO:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS and Windows have no affinity call
            cores = os.cpu_count() or 1
        count = min(cores, n_images // _IMAGES_PER_AUTO_WORKER)
    else:
        count = int(setting)
    return max(1, min(count, n_images))


def write_images(
    plan: Iterable[tuple[RawImage, str]],
    dataset_dir: Path,
    *,
    total: int | None = None,
    image_format: str = KEEP,
    workers: int = 1,
) -> list[ManifestRow]:
    """Write each planned image under ``images/<split>/<class>/`` and describe it.

    ``plan`` is read once, in order; its images must come grouped by (split, class), since
    names are made unique within the group being written (``total``: its length, for the
    progress bar). Workers (:func:`~imgclf.data.imagefile.store_image`) read each source
    file by path and write what is stored of it to a numbered file in a hidden staging
    folder; here, in plan order, each gets its final name and is moved into place. So
    names, files and rows do not depend on the number of workers, no image's bytes pass
    between processes, and only the images in flight are held besides the rows.
    """
    from tqdm import tqdm

    staging = dataset_dir / ".staging"
    staging.mkdir()
    in_flight: collections.deque[tuple[RawImage, str]] = collections.deque()

    def tasks() -> Iterator[StoreTask]:
        for i, entry in enumerate(plan):
            in_flight.append(entry)
            yield entry[0].path, staging / str(i), image_format

    group: tuple[str, str] | None = None
    names: set[str] = set()
    written: set[tuple[str, str]] = set()
    rows = []
    with tqdm(total=total, desc="ingest", unit="img", disable=None) as bar:
        for i, stored in enumerate(_store_in_order(tasks(), workers)):
            image, split = in_flight.popleft()
            if (split, image.label) != group:
                if (split, image.label) in written:
                    raise ValueError(f"plan not grouped by split and class: {image.rel}")
                written.add((split, image.label))
                group, names = (split, image.label), set()
            name = _unique_name(_sanitise_stem(image.path.stem), stored.suffix, names)
            rel = image_path(split, image.label, name)
            target = dataset_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / str(i), target)
            rows.append(
                ManifestRow(
                    path=rel,
                    label=image.label,
                    split=split,
                    width=stored.width,
                    height=stored.height,
                    # the few distinct texts, once each: unpickled, every row had its own copy
                    mode=sys.intern(stored.mode) if stored.mode else None,
                    bytes=stored.bytes,
                    sha256=stored.sha256,
                    error=stored.error,
                    stored=sys.intern(stored.stored),
                    conversion=sys.intern(stored.conversion),
                )
            )
            bar.update()
    staging.rmdir()
    _log_summary(rows)
    rows.sort(key=lambda r: r.path)
    return rows


def _drain(items: list[Any]) -> Iterator[Any]:
    """Yield a list's items from its end, removing each, so none is held once handed on."""
    while items:
        yield items.pop()


def _store_in_order(tasks: Iterable[StoreTask], workers: int) -> Iterator[StoredFile]:
    """:func:`~imgclf.data.imagefile.store_image` for each task, in task order.

    With more than one worker, at most ``workers * _WINDOW_PER_WORKER`` chunks of ``_CHUNK``
    tasks are in flight, so neither tasks nor results pile up however many images there
    are. Workers are spawned, not forked: they start without a copy of this process (whose
    plan grows with the dataset) or its threads, and import only :mod:`imgclf.data.imagefile`.
    """
    chunks = _chunked(tasks, _CHUNK)
    if workers <= 1:
        for chunk in chunks:
            yield from store_images(chunk)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        window = workers * _WINDOW_PER_WORKER
        pending = collections.deque(
            pool.submit(store_images, chunk) for chunk in itertools.islice(chunks, window)
        )
        while pending:
            head = pending.popleft()
            pending.extend(pool.submit(store_images, c) for c in itertools.islice(chunks, 1))
            yield from head.result()


def _chunked(items: Iterable[StoreTask], size: int) -> Iterator[list[StoreTask]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _sanitise_stem(stem: str) -> str:
    """Keep file names portable and visible: ``[A-Za-z0-9._-]`` only, no leading dot.

    (The suffix needs no cleaning: only known image suffixes get this far.)
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")
    return cleaned[:_MAX_STEM] or "image"


def _unique_name(stem: str, suffix: str, used: set[str]) -> str:
    """``stem + suffix``, or ``stem_1 + suffix``, ... if taken (case-insensitively)."""
    candidate, n = stem + suffix, 0
    while candidate.lower() in used:
        n += 1
        candidate = f"{stem}_{n}{suffix}"
    used.add(candidate.lower())
    return candidate


def _log_summary(rows: Sequence[ManifestRow]) -> None:
    converted = [r for r in rows if r.stored == CONVERTED]
    if converted:
        log.info(
            "%d of %d image(s) converted (see the manifest's conversion column)",
            len(converted),
            len(rows),
        )
    bad = [r for r in rows if r.error]
    if bad:
        examples = "; ".join(f"{r.path}: {r.error}" for r in bad[:5])
        log.warning("%d file(s) could not be decoded (kept, see manifest): %s", len(bad), examples)


def _config_record(cfg: IngestConfig) -> dict[str, Any]:
    """The config as saved in ``config.json``: URI credentials and S3 secrets masked."""
    record = to_dict(cfg)
    record["source"] = redact_uri(cfg.source)
    record["s3"] = {k: "***" if _SECRET_KEY.search(str(k)) else v for k, v in dict(cfg.s3).items()}
    return record
