"""Train and evaluate from a dataset's tar shards, local or streamed from ``s3://``.

The shards (``shards/<split>-<NNNNNN>.tar`` and ``shards.json``, written by
:mod:`imgclf.data.shards`) hold the same samples as ``images/``, each split in the seeded
:func:`~imgclf.contracts.shard_order` (so every shard mixes the classes).
:class:`ShardDataset` reads one split of them as a torch ``IterableDataset`` yielding
``(transform(image), label)`` exactly as :class:`~imgclf.data.loader.ManifestDataset` does:
the same decode (:func:`~imgclf.data.loader.decode_image`), the same transforms, the same
``classes`` and label indices, and the manifest path of every sample is checked against the
shard's ``.json`` member, so shards that went stale against the manifest fail loudly.

**Library.** The tar members are read by WebDataset's own iterators
(``webdataset.tariterators``: tar stream to files, files grouped by key into samples) and
shuffled by its shuffle buffer with an RNG we seed. WebDataset's dataset class and its shard
splitters are not used, because they cannot give what training needs:

- its shard shuffle and sample shuffle draw their seed from an epoch counter kept inside
  the dataset object (or from the time and pid), so a resumed process cannot ask for
  "epoch 5 of seed 42" and get the order the killed process had;
- ``split_by_node`` / ``split_by_worker`` deal out whole shards, so ranks get different
  numbers of samples (a DDP rank with one batch more waits forever in its all-reduce), and
  ``with_epoch`` evens them out by cutting or repeating samples, not by seeing each once.

So the plan of an epoch is ours, a function of ``(seed, epoch)`` only:

1. **Shard order**: the split's shards in a permutation drawn from ``(seed, epoch)`` (in
   index order without ``shuffle``). Every rank computes the same one.
2. **Ranks** take contiguous ranges of the samples of that sequence: with ``drop_tail``
   (training) each rank gets exactly ``floor(N / world)`` samples and the last
   ``N mod world`` of the epoch's sequence (fewer than ``world`` samples, different ones
   each epoch) are left out, like DistributedSampler's ``drop_last``; so every rank runs
   the same number of batches. Without it (validation, evaluation) the ranges differ by at
   most one sample and cover the split exactly, as
   :class:`~imgclf.training.distributed.ShardSampler` does.
3. **DataLoader workers** split their rank's range again, in whole batches of
   ``batch_size``: the loader then yields exactly ``ceil(n / batch_size)`` batches
   (``floor`` with ``drop_last``), what ``len(loader)`` says, so the schedule's step count and
   the progress bars hold, and only one worker can have a ragged last batch.
4. **Shuffle buffer**: each worker shuffles its stream through a buffer of
   ``shuffle_buffer`` samples with an RNG seeded from ``(seed, epoch, rank, worker)``.

A range reads only the shards it overlaps; where it starts inside a shard, the samples before
it are read and dropped (a tar stream cannot seek), at most one shard's worth per worker and
epoch. Every sample is seen at most once per epoch, and exactly once when ``N`` divides by
the world size. The order depends on the number of workers (as each worker's augmentation
already does), not on anything else, so a resumed run with the same settings sees the same
batches: :meth:`set_epoch`, then the train loop draws and drops the batches already done.

The epoch lives in shared memory: DataLoader workers (persistent ones included) hold a
copy of the dataset made when they started, and read the epoch when each epoch's iteration
begins.

Mixing: the writer already put each split in a seeded random order, so every shard holds
every class in proportion; the shard-order shuffle and the ``shuffle_buffer`` then make
each epoch's order differ. Shards several times more numerous than ``ranks x workers``
spread the work evenly.

**Streaming.** A shard under ``s3://`` is one GET read as a stream through the minio client
of :mod:`imgclf.storage` (the same endpoint, credentials, timeouts and retries as every other
S3 access); nothing is written to disk. Each shard read to its end is checked against the
size and sha256 ``shards.json`` records.
:func:`~imgclf.data.shard_source.dataset_input` stages a remote dataset for a step without
its shards; which layout a step reads is :func:`~imgclf.data.shard_source.use_shards`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from imgclf.contracts import (
    MANIFEST_FILE,
    SHARDS_FILE,
    SPLITS,
    read_dataset_info,
    sample_key,
    shard_order,
)
from imgclf.data.loader import decode_image, split_rows
from imgclf.data.shard_source import ShardRef, shard_refs
from imgclf.data.shards import read_index
from imgclf.errors import DataError, StorageError
from imgclf.storage import is_remote, split_uri

DEFAULT_SHUFFLE_BUFFER = 2000
"""Samples in each worker's shuffle buffer (``train.shuffle_buffer``)."""

_NOT_IMAGE = {"__key__", "__url__", "__local_path__", "cls", "json"}
_CHUNK = 1 << 20


def _ranges(counts: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(slot, skip, take) for each of ``counts``'s shards overlapping ``[start, stop)`` of
    their concatenation: skip that many samples of the shard, then take that many."""
    out, offset = [], 0
    for slot, count in enumerate(counts):
        low, high = max(start, offset), min(stop, offset + count)
        if low < high:
            out.append((slot, low - offset, high - low))
        offset += count
    return out


def _part(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` of ``total`` items cut into ``parts`` near-equal
    contiguous parts."""
    return total * index // parts, total * (index + 1) // parts


class _ShardStream:
    """A shard's bytes, hashed and counted as they are read (for the index check)."""

    def __init__(self, read: Callable[[int], bytes], url: str) -> None:
        self._read, self.url = read, url
        self.size = 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._read(size if size is not None and size >= 0 else _CHUNK)
        self.digest.update(data)
        self.size += len(data)
        return data

    def verify(self, shard: ShardRef) -> None:
        """Read to the end, then compare size and sha256 with ``shards.json``."""
        while self.read(_CHUNK):
            pass
        if self.size != shard.bytes or self.digest.hexdigest() != shard.sha256:
            raise DataError(
                f"{shard.url}: size or sha256 differs from {SHARDS_FILE}; the shard is corrupt "
                "or was replaced (rerun ingest)"
            )


@contextlib.contextmanager
def _open_shard(url: str, settings: Any) -> Iterator[_ShardStream]:
    if not is_remote(url):
        try:
            fh = open(url, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise DataError(f"{url}: cannot open shard listed in {SHARDS_FILE}: {exc}") from None
        with fh:
            yield _ShardStream(fh.read, url)
        return
    with _s3_object(url, settings) as read:
        yield _ShardStream(read, url)


@contextlib.contextmanager
def _s3_object(url: str, settings: Any) -> Iterator[Callable[[int], bytes]]:
    """A streaming GET of ``url`` through the store's minio client and retry policy."""
    from urllib3.exceptions import HTTPError

    from imgclf.storage.s3client import call_with_retries, describe_failure, make_client

    bucket, name = split_uri(url)
    client = make_client(settings)

    def failure(exc: BaseException, attempts: int = 1) -> StorageError:
        reason = describe_failure(exc, bucket, settings.timeout)
        text = f"cannot read {url} at {settings.url}: {reason}"
        return StorageError(
            settings.redact(text + (f" (after {attempts} attempts)" * (attempts > 1)))
        )

    response = call_with_retries(
        lambda: client.get_object(bucket, name),
        settings,
        fail=failure,
        what=lambda exc: f"read {url}: {describe_failure(exc, bucket, settings.timeout)}",
    )

    def read(size: int) -> bytes:
        try:
            return response.read(size, decode_content=False)
        except (HTTPError, OSError) as exc:
            raise failure(exc) from None

    try:
        yield read
    finally:
        response.close()
        response.release_conn()


def _samples(stream: _ShardStream) -> Iterator[dict[str, Any]]:
    """The samples of a tar stream, grouped by key (WebDataset's own tar iterators)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        yield from group_by_keys(tar_file_expander([{"url": stream.url, "stream": stream}]))
    except (tarfile.TarError, ValueError) as exc:
        raise DataError(f"{stream.url}: not a readable shard: {exc.args[0]}") from None


class ShardDataset(IterableDataset):
    """One split of a dataset's shards as ``(transform(image), label_index)`` pairs.

    See the module docstring for the order. ``len()`` is this rank's number of samples per
    epoch; ``total`` the split's. ``shuffle`` shuffles shards and samples per epoch (set it
    with :meth:`set_epoch`); ``drop_tail`` (default: ``shuffle``) gives every rank exactly
    ``total // world_size`` samples; ``batch_size`` is the DataLoader's, so that workers split
    a rank's samples in whole batches. ``classes``, ``class_to_idx`` and ``targets`` are
    those of :class:`~imgclf.data.loader.ManifestDataset`; ``rows`` holds the split's
    ``(manifest path, label)`` in shard order.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        transform: Callable[[Any], Any] | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        rank: int = 0,
        world_size: int = 1,
        drop_tail: bool | None = None,
        batch_size: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if not 0 <= rank < world_size or batch_size < 1 or shuffle_buffer < 1:
            raise DataError(
                f"ShardDataset: rank {rank} of world {world_size}, batch_size {batch_size}, "
                f"shuffle_buffer {shuffle_buffer}: out of range"
            )
        self.root = Path(dataset_dir)
        self.split, self.transform = split, transform
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.classes: list[str] = list(read_dataset_info(self.root)["classes"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        rows = split_rows(self.root, split, self.classes)
        # shard position i holds manifest row order[i] (the writer mixed the classes)
        order = shard_order(len(rows), int(read_index(self.root).get("order_seed", 0)))
        self.rows = [rows[i] for i in order]
        self.targets = [label for _, label in self.rows]
        self.shards = shard_refs(self.root, split)
        self.total = sum(s.samples for s in self.shards)
        if self.total != len(self.rows):
            raise DataError(
                f"{self.root / SHARDS_FILE}: {self.total} samples in split {split!r}, but "
                f"{MANIFEST_FILE} lists {len(self.rows)} usable images; rerun ingest"
            )
        tail = shuffle if drop_tail is None else drop_tail
        if tail:
            per_rank = self.total // world_size
            self.start, self.stop = rank * per_rank, (rank + 1) * per_rank
        else:
            self.start, self.stop = _part(self.total, world_size, rank)
        self._settings = None
        if any(is_remote(s.url) for s in self.shards):
            from imgclf.storage.s3config import resolve_s3_settings

            self._settings = resolve_s3_settings()  # the edge's s3 section, for every worker
        # shared memory: persistent DataLoader workers see the epoch the main process sets
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def paths(self) -> list[str]:
        """The split's manifest paths, in the order an unshuffled single reader yields."""
        return [path for path, _ in self.rows]

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on (workers included)."""
        self._epoch.fill_(int(epoch))

    def shard_order(self, epoch: int) -> list[int]:
        """The shards' indices in the order ``epoch`` reads them (the same on every rank)."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order

    def worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        """``[start, stop)`` of the epoch's sample sequence that ``worker`` of ``workers``
        reads on this rank: its share of the rank's batches."""
        size = len(self)
        batches = -(-size // self.batch_size)
        low, high = _part(batches, workers, worker)
        return (
            self.start + min(size, low * self.batch_size),
            self.start + min(size, high * self.batch_size),
        )

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self._epoch.item())
        records: Iterable[tuple[int, dict[str, Any]]] = self._records(
            self.shard_order(epoch), *self.worker_range(worker, workers)
        )
        if self.shuffle:
            from webdataset.filters import shuffle

            rng = random.Random(f"samples/{self.seed}/{epoch}/{self.rank}/{worker}")
            records = shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(records)
        for position, sample in records:
            yield self._item(position, sample)

    def _records(
        self, order: list[int], start: int, stop: int
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        counts = [self.shards[i].samples for i in order]
        for slot, skip, take in _ranges(counts, start, stop):
            yield from self.read_shard(order[slot], skip, take)

    def read_shard(
        self, index: int, skip: int = 0, take: int | None = None
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in split, raw sample) of shard ``index``: ``take`` samples (default:
        the rest) after the first ``skip``; the shard is verified when read to its end."""
        shard = self.shards[index]
        stop = shard.samples if take is None else skip + take
        with _open_shard(shard.url, self._settings) as stream:
            seen = 0
            for sample in _samples(stream):
                if seen >= stop:
                    return
                position = shard.first + seen
                if sample["__key__"] != sample_key(position):
                    raise DataError(
                        f"{shard.url}: sample {seen} has key {sample['__key__']!r}, expected "
                        f"{sample_key(position)!r}; the shard is not in the {SHARDS_FILE} layout"
                    )
                if seen >= skip:
                    yield position, sample
                seen += 1
            if seen != shard.samples:
                raise DataError(
                    f"{shard.url}: {seen} samples, {SHARDS_FILE} says {shard.samples}; rerun ingest"
                )
            stream.verify(shard)

    def _item(self, position: int, sample: dict[str, Any]) -> tuple[Any, int]:
        path, label = self.rows[position]
        where = f"{sample['__url__']}:{sample['__key__']} ({path})"
        try:
            meta = json.loads(sample["json"])
            shard_label = int(sample["cls"])
            (ext,) = [k for k in sample if k not in _NOT_IMAGE]
        except (KeyError, ValueError) as exc:
            raise DataError(f"{where}: malformed sample ({exc})") from None
        if meta.get("path") != path or shard_label != label:
            raise DataError(
                f"{where}: the shard holds {meta.get('path')!r} label {shard_label}, "
                f"{MANIFEST_FILE} says label {label}; the shards are stale (rerun ingest)"
            )
        return decode_image(io.BytesIO(sample[ext]), self.transform, where), label


def read_images(dataset_dir: str | Path, split: str, paths: Iterable[str]) -> dict[str, bytes]:
    """The stored bytes of the images at manifest ``paths`` of ``split``, from its shards.

    Only the shards holding them are read, each up to its last wanted sample. Paths not in
    the split are absent from the result.
    """
    dataset = ShardDataset(dataset_dir, split)
    wanted = set(paths)
    positions = {i for i, (path, _) in enumerate(dataset.rows) if path in wanted}
    found: dict[str, bytes] = {}
    for index, shard in enumerate(dataset.shards):
        mine = [p - shard.first for p in positions if 0 <= p - shard.first < shard.samples]
        if not mine:
            continue
        for position, sample in dataset.read_shard(index, 0, max(mine) + 1):
            if position in positions:
                (ext,) = [k for k in sample if k not in _NOT_IMAGE]
                found[dataset.rows[position][0]] = sample[ext]
    return found
