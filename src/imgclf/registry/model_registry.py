"""The model registry: numbered, immutable model versions and movable aliases on any Store.

Layout (relative to the store root, see docs/CONTRACTS.md)::

    models/<name>/<version>/CLAIM          who publishes this number (created first, once)
    models/<name>/<version>/model/...      the model dir, file for file
    models/<name>/<version>/metrics.json   evaluation metrics
    models/<name>/<version>/lineage.json   dataset hash, git commit, params, source, ...
    models/<name>/<version>/READY          written last: file list with sha256
    models/<name>/aliases/<alias>.json     {"version": N, "previous": M|null, "updated_at"}

A store cannot publish many objects atomically, so a version exists only once its ``READY``
marker does; readers ignore every prefix without it. Moving an alias is one ``write_bytes``,
which both backends make atomic, so a reader sees the old or the new alias, never a mix.
Only the :class:`~imgclf.storage.Store` protocol is used, so the registry works the same on
a local directory and on S3.

Version numbers are allocated by :meth:`~imgclf.storage.Store.create_exclusive` of the
version's ``CLAIM``: a publish tries one past the highest number present (complete or not,
so the files of a publish that crashed are never mistaken for a later model) and, when
another writer created that claim first, the next one, before uploading anything. Of any
number of concurrent publishes, each therefore owns a distinct number and no two ever write
into one prefix. The claim is read back before ``READY`` as a last guard against a store
whose conditional create was not what it promised.

:meth:`ModelRegistry.gc` removes the prefixes that publishes which died left behind, after
a grace period; the highest number it frees may then be claimed again, which is safe since
nothing can name a version that never completed.

Every read of a version's files is checked against ``READY``: :meth:`ModelRegistry.download`
hashes what it fetched, :meth:`ModelRegistry.champion` the ``model.json`` it parses, and
:meth:`ModelRegistry.verify` every stored file. A mismatch is a :class:`VersionIntegrityError`
naming the file, so a flipped byte is refused instead of served or scored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from imgclf.contracts import (
    METRICS_FILE,
    MODEL_FILE,
    READY_FILE,
    WEIGHTS_FILE,
    marker_files,
    model_dir_checksums,
    ready_marker,
)
from imgclf.errors import RegistryError, StorageError
from imgclf.fsutil import atomic_dir, sha256_file
from imgclf.registry.records import (
    Champion,
    GcEntry,
    IntegrityProblem,
    VersionInfo,
    default_registered_by,
    utc_now,
    validate_name,
)
from imgclf.storage import Store, open_store

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
MODEL_SUBDIR = "model"
CLAIM = "CLAIM"
LINEAGE_FILE = "lineage.json"
DEFAULT_GC_GRACE = dt.timedelta(hours=24)
# Each failed claim means another publish took that number (or, on stores that decide by
# listing, contended for it), so this bounds a pathological store, not a busy registry.
_CLAIM_ATTEMPTS = 100


class VersionIntegrityError(RegistryError, StorageError):
    """A complete version's stored files differ from what its ``READY`` marker records.

    A RegistryError because it is about a version; also a StorageError because the store
    no longer holds the bytes written to it, the same class the S3 store raises for an
    object whose content contradicts its recorded sha256. Callers that fall back when a
    model merely cannot be used, but let store failures through (the evaluate gate's
    champion re-scoring), thereby refuse a tampered version instead of working around it.
    """

    def __init__(self, message: str, problems: Iterable[IntegrityProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def of(cls, problems: list[IntegrityProblem], remedy: str) -> VersionIntegrityError:
        """One line: the first problem (it names the file), how many more, what to do."""
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return cls(f"{problems[0]}{more}; {remedy}", problems)


def _load_json(store: Store, key: str) -> Any:
    try:
        return json.loads(store.read_bytes(key))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{store.uri}/{key}: not valid JSON ({exc})") from None


def _dump_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


@contextlib.contextmanager
def _tree_of(source: Path, rels: Collection[str]) -> Iterator[Path]:
    """A directory holding exactly the files ``rels`` of ``source``: ``source`` itself when
    it holds nothing else, else a temporary copy of just those.

    ``upload_tree`` sends every file of a tree, and a stray hidden file (a temp file left by
    an editor) must not be published: KServe would download it with the model.
    """
    present = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    if present == set(rels):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="imgclf-publish-") as tmp:
        for rel in rels:
            target = Path(tmp, *rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.joinpath(*rel.split("/")), target)
        yield Path(tmp)


class ModelRegistry:
    """Publish, list, fetch and alias model versions stored under ``models/`` of a Store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, uri: str | os.PathLike[str]) -> ModelRegistry:
        """The registry rooted at ``uri``: a local directory or ``s3://bucket/prefix``."""
        return cls(open_store(str(uri)))

    @property
    def uri(self) -> str:
        """Where the registry lives (the store's URI)."""
        return self.store.uri

    # -- keys ---------------------------------------------------------------------------

    @staticmethod
    def version_prefix(name: str, version: int) -> str:
        """Store key prefix of one version (no trailing slash)."""
        return f"models/{validate_name(name)}/{int(version)}"

    @classmethod
    def model_prefix(cls, name: str, version: int) -> str:
        """Store key prefix of a version's model dir; the InferenceService storage URI."""
        return f"{cls.version_prefix(name, version)}/{MODEL_SUBDIR}"

    @staticmethod
    def _alias_key(name: str, alias: str) -> str:
        return f"models/{validate_name(name)}/aliases/{validate_name(alias, 'alias')}.json"

    # -- scanning -----------------------------------------------------------------------

    def _scan(self, name: str) -> tuple[set[int], set[int]]:
        """(every version number with any object, the READY ones), from one recursive list."""
        base = f"models/{validate_name(name)}/"
        seen: set[int] = set()
        ready: set[int] = set()
        for key in self.store.list(base):
            head, _, rest = key[len(base) :].partition("/")
            if not head.isdigit():
                continue
            seen.add(int(head))
            if rest == READY_FILE:
                ready.add(int(head))
        return seen, ready

    def _ready_versions(self, name: str) -> list[int]:
        return sorted(self._scan(name)[1])

    def _require_ready(self, name: str, version: int) -> None:
        if not self.store.exists(f"{self.version_prefix(name, version)}/{READY_FILE}"):
            ready = self._ready_versions(name)
            listed = ", ".join(map(str, ready)) or "none"
            raise RegistryError(
                f"model {name!r} has no complete version {version} "
                f"(ready versions: {listed}; registry: {self.uri})"
            )

    def _aliases_of(self, name: str) -> dict[int, list[str]]:
        base = f"models/{validate_name(name)}/aliases/"
        by_version: dict[int, list[str]] = {}
        for key in self.store.list(base):
            if not key.endswith(".json"):
                continue
            alias = key[len(base) : -len(".json")]
            doc = _load_json(self.store, key)
            by_version.setdefault(int(doc["version"]), []).append(alias)
        return by_version

    # -- reading ------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models that have at least one complete version."""
        names = set()
        for key in self.store.list("models/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[2].isdigit() and parts[3] == READY_FILE:
                names.add(parts[1])
        return sorted(names)

    def _info(self, name: str, version: int, aliases: list[str]) -> VersionInfo:
        prefix = self.version_prefix(name, version)
        marker = _load_json(self.store, f"{prefix}/{READY_FILE}")
        metrics = _load_json(self.store, f"{prefix}/{METRICS_FILE}")
        lineage = _load_json(self.store, f"{prefix}/{LINEAGE_FILE}")
        accuracy = metrics.get("accuracy")
        return VersionInfo(
            name=name,
            version=version,
            created_at=str(marker.get("created_at") or lineage.get("created_at") or ""),
            accuracy=float(accuracy) if isinstance(accuracy, int | float) else None,
            dataset_hash=lineage.get("dataset_hash"),
            model_sha256=marker.get("model_sha256"),
            aliases=tuple(sorted(aliases)),
            uri=f"{self.uri.rstrip('/')}/{self.model_prefix(name, version)}",
            files=marker_files(marker),
            metrics=metrics,
            lineage=lineage,
        )

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every complete version of ``name``, oldest first (empty if the model is unknown)."""
        aliases = self._aliases_of(name)
        return [self._info(name, v, aliases.get(v, [])) for v in self._ready_versions(name)]

    def get(self, name: str, version: int) -> VersionInfo:
        """One complete version; RegistryError if it does not exist or never finished."""
        self._require_ready(name, version)
        return self._info(name, version, self._aliases_of(name).get(int(version), []))

    def find_by_sha256(self, name: str, model_sha256: str) -> VersionInfo | None:
        """The newest complete version whose weights have this sha256 and whose stored files
        still match its ``READY`` record, if any.

        Deploy reuses (and promotes) what this returns instead of publishing, so a version
        whose files were altered after publishing must not count: it is skipped, with a
        warning, and the caller publishes the good model as a new version.
        """
        for info in reversed(self.list_versions(name)):
            if info.model_sha256 != model_sha256:
                continue
            problems = self.verify(name, info.version)
            if not problems:
                return info
            log.warning(
                "not reusing %s version %d: %s", name, info.version, "; ".join(map(str, problems))
            )
        return None

    def download(self, name: str, version: int, dest: str | os.PathLike[str]) -> Path:
        """Copy a version's model dir to ``dest`` (replaced atomically), checking every sha256.

        The checksums come from the READY marker, so a file altered, truncated, removed or
        added in the store after publishing is a :class:`VersionIntegrityError` naming it,
        and ``dest`` keeps what it held before: nothing unverified is ever served or scored.
        """
        info = self.get(name, version)
        prefix = self.model_prefix(name, version)
        target = Path(dest)
        with atomic_dir(target) as tmp:
            self.store.download_tree(prefix, tmp)
            found = {
                p.relative_to(tmp).as_posix(): sha256_file(p) for p in tmp.rglob("*") if p.is_file()
            }
            problems = self._compare(name, version, info.files, found)
            if problems:
                raise self._refusal(name, version, problems)
        return target

    def alias(self, name: str, alias: str = DEFAULT_ALIAS) -> int | None:
        """The version ``alias`` points to, or None if it was never set."""
        doc = self.alias_doc(name, alias)
        return None if doc is None else int(doc["version"])

    def alias_doc(self, name: str, alias: str = DEFAULT_ALIAS) -> dict[str, Any] | None:
        """The alias record (``version``, ``previous``, ``updated_at``, ...), or None."""
        key = self._alias_key(name, alias)
        if not self.store.exists(key):
            return None
        return _load_json(self.store, key)

    def champion(self, name: str, alias: str = DEFAULT_ALIAS) -> Champion | None:
        """The version ``alias`` serves, with its model.json, metrics and dataset hash; None
        if the alias was never set (the first model).

        The one alias lookup for the evaluate gate and the retraining policy. It reads only
        the few small files they need (the model dir stays in the store until
        :meth:`download`) and tolerates a missing metrics, lineage or model.json, but an
        alias at a version without ``READY`` is a RegistryError: the registry is
        inconsistent and neither caller may guess. ``model.json`` is part of the model dir,
        so its bytes must match ``READY`` (else :class:`VersionIntegrityError`); metrics
        and lineage sit beside the model dir and ``READY`` records no sha256 for them.
        """
        doc = self.alias_doc(name, alias)
        if doc is None:
            return None
        where = f"{self.uri}/{self._alias_key(name, alias)}"
        version = doc.get("version") if isinstance(doc, dict) else None
        if isinstance(version, bool) or not isinstance(version, int):
            raise RegistryError(f"{where}: expected {{'version': N}} with an integer N")
        prefix = self.version_prefix(name, version)
        if not self.store.exists(f"{prefix}/{READY_FILE}"):
            raise RegistryError(
                f"{where} points at version {version}, which has no {READY_FILE} marker "
                "(incomplete publish); promote a complete version"
            )
        files = marker_files(_load_json(self.store, f"{prefix}/{READY_FILE}"))
        lineage = self._optional_json(f"{prefix}/{LINEAGE_FILE}") or {}
        trained_on = lineage.get("dataset_hash")
        return Champion(
            version=version,
            model_json=self._verified_model_json(name, version, files),
            metrics=self._optional_json(f"{prefix}/{METRICS_FILE}") or {},
            dataset_hash=trained_on if isinstance(trained_on, str) and trained_on else None,
        )

    def _optional_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at ``key``, or None when there is no such object."""
        if not self.store.exists(key):
            return None
        return self._json_object(key, self.store.read_bytes(key))

    def _json_object(self, key: str, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.uri}/{key}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise RegistryError(f"{self.uri}/{key}: expected a JSON object")
        return data

    def _verified_model_json(
        self, name: str, version: int, files: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """The version's ``model/model.json`` once its bytes match ``READY``; None when the
        version has none (published by hand). The gate decides on its classes, so a file
        edited in the store must not be believed."""
        key = f"{self.model_prefix(name, version)}/{MODEL_FILE}"
        raw = self.store.read_bytes(key) if self.store.exists(key) else None
        found = {} if raw is None else {MODEL_FILE: hashlib.sha256(raw).hexdigest()}
        expected = {MODEL_FILE: files[MODEL_FILE]} if MODEL_FILE in files else {}
        problems = self._compare(name, version, expected, found)
        if problems:
            raise self._refusal(name, version, problems)
        return None if raw is None else self._json_object(key, raw)

    # -- integrity ----------------------------------------------------------------------

    def _compare(
        self, name: str, version: int, expected: Mapping[str, str], found: Mapping[str, str]
    ) -> list[IntegrityProblem]:
        """What differs between the model files ``READY`` lists (``expected``) and those
        present (``found``), both ``{path relative to the model dir: sha256}``."""
        prefix = self.model_prefix(name, version)
        problems = []
        for rel in sorted(expected.keys() | found.keys()):
            want, got = expected.get(rel), found.get(rel)
            if want == got:
                continue
            if got is None:
                detail = f"missing (listed in {READY_FILE})"
            elif want is None:
                detail = f"not listed in {READY_FILE} (added after publishing)"
            else:
                detail = (
                    f"sha256 {got[:12]}... does not match {want[:12]}... recorded in "
                    f"{READY_FILE} at publish time (corrupted or overwritten)"
                )
            problems.append(self._problem(name, version, f"{prefix}/{rel}", detail))
        return problems

    @staticmethod
    def _refusal(
        name: str, version: int, problems: list[IntegrityProblem]
    ) -> VersionIntegrityError:
        return VersionIntegrityError.of(
            problems,
            f"refusing to use {name!r} version {version} "
            f"(`imgclf registry verify {name}` checks every version)",
        )

    def _problem(self, name: str, version: int, key: str, detail: str) -> IntegrityProblem:
        return IntegrityProblem(name, version, key, detail, f"{self.uri.rstrip('/')}/{key}")

    def ready_versions(self, name: str) -> list[int]:
        """Numbers of the complete versions of ``name``, oldest first (one listing)."""
        return self._ready_versions(name)

    def verify(self, name: str | None = None, version: int | None = None) -> list[IntegrityProblem]:
        """Check every stored file of the complete versions (of ``name``, or of every model;
        just ``version`` when given) against their ``READY`` records; [] when all match.

        Files are hashed as they stream from the store, never held in memory whole. Missing,
        altered and unlisted model files are reported, as is a ``READY`` that cannot be read
        or whose ``model_sha256`` (the model's identity for deploy) contradicts its own list.
        """
        if version is not None and name is None:
            raise RegistryError("verify: a version needs the model name")
        names = [validate_name(name)] if name is not None else self.models()
        problems: list[IntegrityProblem] = []
        for model in names:
            if version is not None:
                self._require_ready(model, version)
            for number in [int(version)] if version is not None else self._ready_versions(model):
                problems += self._version_problems(model, number)
        return problems

    def _version_problems(self, name: str, version: int) -> list[IntegrityProblem]:
        ready_key = f"{self.version_prefix(name, version)}/{READY_FILE}"
        try:
            marker = _load_json(self.store, ready_key)
        except RegistryError:
            marker = None
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
            detail = "not a valid READY marker (expected JSON with a 'files' mapping)"
            return [self._problem(name, version, ready_key, detail)]
        files = marker_files(marker)
        problems = []
        if marker.get("model_sha256") != files.get(WEIGHTS_FILE):
            problems.append(
                self._problem(
                    name, version, ready_key, f"model_sha256 differs from its {WEIGHTS_FILE} entry"
                )
            )
        prefix = self.model_prefix(name, version)
        found = {
            key[len(prefix) + 1 :]: self.store.content_sha256(key)
            for key in self.store.list(prefix)
        }
        return problems + self._compare(name, version, files, found)

    # -- garbage collection -------------------------------------------------------------

    def gc(
        self,
        name: str | None = None,
        *,
        older_than: dt.timedelta = DEFAULT_GC_GRACE,
        dry_run: bool = False,
        now: dt.datetime | None = None,
    ) -> list[GcEntry]:
        """Remove the incomplete versions (no ``READY``) of ``name``, or of every model,
        whose newest object is at least ``older_than`` old; returns what was (or, with
        ``dry_run``, would be) removed.

        A publish that died (a killed pod, a lost store) leaves its prefix behind forever:
        readers ignore it, but it accumulates. The grace period keeps the prefix of a
        publish still uploading: it must exceed the longest publish. A complete version and
        any version an alias names are never touched, and ``READY`` is looked for again
        right before deleting. ``now`` (default: the current UTC time) is what ages are
        measured from.
        """
        if older_than < dt.timedelta(0):
            raise RegistryError(f"gc: older_than must be >= 0, got {older_than}")
        now = now if now is not None else dt.datetime.now(dt.UTC)
        names = [validate_name(name)] if name is not None else self._all_names()
        entries = []
        for model in names:
            for version, objects, newest in self._abandoned(model, now - older_than):
                prefix = self.version_prefix(model, version)
                removed = False
                if not dry_run and not self.store.exists(f"{prefix}/{READY_FILE}"):
                    self.store.delete(prefix, recursive=True)
                    removed = True
                    log.info("removed %s/%s (incomplete version)", self.uri, prefix)
                if dry_run or removed:
                    entries.append(GcEntry(model, version, prefix, objects, newest, removed))
        return entries

    def _all_names(self) -> list[str]:
        """Every model with any object, complete versions or not (``models()`` lists only
        models with a complete version, and gc must see those with none)."""
        names = []
        for entry in self.store.list("models/", recursive=False):
            candidate = entry[len("models/") :].strip("/")
            with contextlib.suppress(RegistryError):
                names.append(validate_name(candidate))
        return sorted(names)

    def _abandoned(self, name: str, cutoff: dt.datetime) -> list[tuple[int, int, dt.datetime]]:
        """(version, object count, newest object time) of each incomplete version of
        ``name`` that no alias names and whose newest object is not after ``cutoff``."""
        base = f"models/{name}/"
        by_version: dict[int, list[dt.datetime]] = {}
        ready: set[int] = set()
        for key, when in self.store.modified_times(base).items():
            head, _, rest = key[len(base) :].partition("/")
            if head.isdigit():
                by_version.setdefault(int(head), []).append(when)
                if rest == READY_FILE:
                    ready.add(int(head))
        keep = ready | self._alias_targets(name)
        return [
            (version, len(times), max(times))
            for version, times in sorted(by_version.items())
            if version not in keep and max(times) <= cutoff
        ]

    def _alias_targets(self, name: str) -> set[int]:
        """Every version an alias record names: served, canary or previous."""
        base = f"models/{validate_name(name)}/aliases/"
        targets: set[int] = set()
        for key in self.store.list(base):
            if not key.endswith(".json"):
                continue
            doc = _load_json(self.store, key)
            if not isinstance(doc, dict):
                raise RegistryError(
                    f"{self.uri}/{key}: expected a JSON object; gc stops rather than guess "
                    "which version the alias protects"
                )
            canary = doc.get("canary")
            for value in (
                doc.get("version"),
                doc.get("previous"),
                canary.get("version") if isinstance(canary, dict) else None,
            ):
                if isinstance(value, int) and not isinstance(value, bool):
                    targets.add(value)
        return targets

    # -- writing ------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        model_dir: str | os.PathLike[str],
        metrics: Mapping[str, Any],
        lineage: Mapping[str, Any],
        checksums: Mapping[str, str] | None = None,
    ) -> int:
        """Upload ``model_dir`` as the next free version of ``name``; returns its number.

        The number is claimed (see :meth:`_claim`) before anything is uploaded, so concurrent
        publishes get distinct numbers and never write into each other's prefix.
        ``checksums`` is :func:`~imgclf.contracts.model_dir_checksums` of ``model_dir`` when
        the caller already computed it (deploy does, to recognise weights it published
        before), so no file is hashed twice; else it is computed here. ``lineage`` gets
        ``created_at`` and ``registered_by`` when it lacks them. The model dir goes up in one
        ``upload_tree`` (parallel on S3), and nothing is visible until the READY marker,
        written last, lands.
        """
        validate_name(name)
        source = Path(model_dir)
        if not source.is_dir():
            raise RegistryError(f"{source}: model dir not found")
        checksums = dict(checksums) if checksums is not None else model_dir_checksums(source)
        if not checksums:
            raise RegistryError(f"{source}: model dir is empty")
        created_at = utc_now()
        lineage_doc = {"created_at": created_at, "registered_by": default_registered_by()}
        lineage_doc.update(lineage)

        token = uuid.uuid4().hex
        version = self._claim(name, token)
        prefix = self.version_prefix(name, version)
        with _tree_of(source, checksums) as tree:
            self.store.upload_tree(tree, f"{prefix}/{MODEL_SUBDIR}")
        self.store.write_bytes(f"{prefix}/{METRICS_FILE}", _dump_json(dict(metrics)))
        self.store.write_bytes(f"{prefix}/{LINEAGE_FILE}", _dump_json(lineage_doc))
        if self.store.read_bytes(f"{prefix}/{CLAIM}").decode("ascii", "replace") != token:
            raise RegistryError(
                f"{self.uri}/{prefix}: the claim on version {version} of model {name!r} was "
                "replaced while publishing (removed by gc, or a store whose conditional create "
                "is not atomic); run the deploy again"
            )
        marker = ready_marker(version, created_at, checksums)
        self.store.write_bytes(f"{prefix}/{READY_FILE}", _dump_json(marker))
        return version

    def _claim(self, name: str, token: str) -> int:
        """A version number this publish owns: its ``CLAIM`` created exclusively with
        ``token``, starting one past the highest number present.

        A lost claim means another publish holds that number, so the next is tried after a
        fresh listing (which skips every number taken meanwhile) and a short random pause
        (on stores that decide by listing, writers that saw each other all lose, and the
        pause keeps them from colliding again on the next number).
        """
        seen, _ = self._scan(name)
        version = max(seen, default=0) + 1
        for attempt in range(_CLAIM_ATTEMPTS):
            claim = f"{self.version_prefix(name, version)}/{CLAIM}"
            if self.store.create_exclusive(claim, token.encode("ascii")):
                return version
            log.debug("version %d of %s is taken; trying the next", version, name)
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
            seen, _ = self._scan(name)
            version = max(max(seen, default=0) + 1, version + 1)
        raise RegistryError(
            f"model {name!r}: no version number could be claimed in {_CLAIM_ATTEMPTS} tries "
            f"(registry: {self.uri}); is something else writing CLAIM objects there?"
        )

    def _write_alias(self, name: str, alias: str, doc: dict[str, Any]) -> None:
        # One write_bytes: atomic on both backends, so readers never see a torn alias.
        self.store.write_bytes(self._alias_key(name, alias), _dump_json(doc))

    def promote(self, name: str, version: int, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        """Point ``alias`` at ``version`` (which must be complete); returns the alias record.

        Promoting the version the alias already holds changes nothing, so a rerun of the
        deploy step does not erase the ``previous`` version a rollback needs.
        """
        version = int(version)
        self._require_ready(name, version)
        current = self.alias_doc(name, alias)
        if current is not None and int(current["version"]) == version:
            if current.get("canary"):
                # Promoting what already serves ends a running canary: all traffic stays here.
                doc = {k: v for k, v in current.items() if k != "canary"}
                doc["updated_at"] = utc_now()
                self._write_alias(name, alias, doc)
                return doc
            return current
        doc = {
            "version": version,
            "previous": None if current is None else int(current["version"]),
            "updated_at": utc_now(),
            "action": "promote",
        }
        self._write_alias(name, alias, doc)
        return doc

    def restore_alias(self, name: str, alias: str, doc: Mapping[str, Any] | None) -> None:
        """Put back an alias record read earlier (``None``: the alias did not exist).

        Deploy reads the record before moving the alias and restores it when the cluster
        does not take the new version, so the registry never claims what is not serving.
        """
        if doc is None:
            self.store.delete(self._alias_key(name, alias))
        else:
            self._write_alias(name, alias, dict(doc))

    def start_canary(
        self, name: str, version: int, percent: int, alias: str = DEFAULT_ALIAS
    ) -> dict[str, Any]:
        """Record that ``version`` takes ``percent`` of the traffic of ``alias``'s service.

        The alias keeps pointing at the version that takes the rest (evaluation compares
        against it, rollbacks return to it) until :meth:`finish_canary` moves it.
        """
        version = int(version)
        self._require_ready(name, version)
        current = self.alias_doc(name, alias)
        if current is None:
            raise RegistryError(
                f"model {name!r} has no alias {alias!r} yet: a canary needs a version already "
                "serving; promote without --canary"
            )
        if int(current["version"]) == version:
            raise RegistryError(f"version {version} already holds alias {alias!r}")
        doc = {
            **{k: v for k, v in current.items() if k != "canary"},
            "canary": {"version": version, "percent": int(percent), "started_at": utc_now()},
            "updated_at": utc_now(),
        }
        self._write_alias(name, alias, doc)
        return doc

    def finish_canary(self, name: str, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        """Move ``alias`` to its canary version (all traffic); RegistryError if none runs."""
        current = self.alias_doc(name, alias) or {}
        canary = current.get("canary")
        if not canary:
            raise RegistryError(f"model {name!r} alias {alias!r} has no canary to finish")
        doc = self.promote(name, int(canary["version"]), alias)
        return doc

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        """Move ``alias`` back: to the ``previous`` version it recorded, if that is still
        complete, else to the highest complete version below the current one.

        The new record's ``previous`` is the next complete version further down, so
        repeated rollbacks walk back through history instead of toggling between two
        versions. RegistryError if the alias is unset or nothing older exists.
        """
        current = self.alias_doc(name, alias)
        if current is None:
            raise RegistryError(
                f"model {name!r} has no alias {alias!r} to roll back (registry: {self.uri})"
            )
        if current.get("canary"):
            # A canary is rolled back by dropping it: the alias already holds the old version.
            doc = {k: v for k, v in current.items() if k != "canary"}
            doc.update(
                {
                    "updated_at": utc_now(),
                    "action": "rollback",
                    "rolled_back_from": int(current["canary"]["version"]),
                }
            )
            self._write_alias(name, alias, doc)
            return doc
        now = int(current["version"])
        ready = self._ready_versions(name)
        previous = current.get("previous")
        if previous is not None and int(previous) in ready and int(previous) != now:
            target = int(previous)
        else:
            older = [v for v in ready if v < now]
            if not older:
                raise RegistryError(
                    f"cannot roll back {name!r} alias {alias!r}: version {now} has no "
                    f"earlier complete version (registry: {self.uri})"
                )
            target = older[-1]
        below = [v for v in ready if v < target]
        doc = {
            "version": target,
            "previous": below[-1] if below else None,
            "updated_at": utc_now(),
            "action": "rollback",
            "rolled_back_from": now,
        }
        self._write_alias(name, alias, doc)
        return doc
