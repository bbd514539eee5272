"""The model registry: numbered, immutable model versions and movable aliases on any Store.

Layout (relative to the store root, see docs/CONTRACTS.md)::

    models/<name>/<version>/CLAIM          who is publishing this number (written first)
    models/<name>/<version>/model/...      the model dir, file for file
    models/<name>/<version>/metrics.json   evaluation metrics
    models/<name>/<version>/lineage.json   dataset hash, git commit, params, source, ...
    models/<name>/<version>/READY          written last: file list with sha256
    models/<name>/aliases/<alias>.json     {"version": N, "previous": M|null, "updated_at"}

A store cannot publish many objects atomically, so a version exists only once its ``READY``
marker does; readers ignore every prefix without it. Version numbers are never reused: the
next number is one past the highest prefix present, complete or not, so the files of a
publish that crashed can never be mistaken for a later model. Moving an alias is one
``write_bytes``, which both backends make atomic, so a reader sees the old or the new alias,
never a mix. Only the :class:`~imgclf.storage.Store` protocol is used, so the registry works
the same on a local directory and on S3.

Concurrent publishes of the *same* model name are detected (each writes a random claim
token first and checks it is still its own before writing ``READY``), not serialised: the
loser fails with RegistryError and leaves an incomplete prefix behind, which is harmless.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from imgclf.contracts import (
    METRICS_FILE,
    MODEL_FILE,
    READY_FILE,
    marker_files,
    model_dir_checksums,
    ready_marker,
)
from imgclf.errors import RegistryError
from imgclf.fsutil import atomic_dir, files_not_matching
from imgclf.registry.records import (
    Champion,
    VersionInfo,
    default_registered_by,
    utc_now,
    validate_name,
)
from imgclf.storage import Store, open_store

DEFAULT_ALIAS = "production"
MODEL_SUBDIR = "model"
CLAIM = "CLAIM"
LINEAGE_FILE = "lineage.json"


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
        """The newest complete version whose weights have this sha256, if any."""
        for info in reversed(self.list_versions(name)):
            if info.model_sha256 == model_sha256:
                return info
        return None

    def download(self, name: str, version: int, dest: str | os.PathLike[str]) -> Path:
        """Copy a version's model dir to ``dest`` (replaced atomically), checking every sha256.

        The checksums come from the READY marker, so a file altered or truncated in the
        store after publishing is caught here instead of being served.
        """
        info = self.get(name, version)
        prefix = self.model_prefix(name, version)
        target = Path(dest)
        with atomic_dir(target) as tmp:
            self.store.download_tree(prefix, tmp)
            bad = files_not_matching(tmp, info.files)
            if bad:
                raise RegistryError(
                    f"{self.uri}/{prefix}: {', '.join(bad)} missing or not matching the sha256 "
                    f"recorded in {READY_FILE} at publish time (corrupted or overwritten)"
                )
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
        inconsistent and neither caller may guess.
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
        lineage = self._optional_json(f"{prefix}/{LINEAGE_FILE}") or {}
        trained_on = lineage.get("dataset_hash")
        return Champion(
            version=version,
            model_json=self._optional_json(f"{prefix}/{MODEL_SUBDIR}/{MODEL_FILE}"),
            metrics=self._optional_json(f"{prefix}/{METRICS_FILE}") or {},
            dataset_hash=trained_on if isinstance(trained_on, str) and trained_on else None,
        )

    def _optional_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at ``key``, or None when there is no such object."""
        if not self.store.exists(key):
            return None
        data = _load_json(self.store, key)
        if not isinstance(data, dict):
            raise RegistryError(f"{self.uri}/{key}: expected a JSON object")
        return data

    # -- writing ------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        model_dir: str | os.PathLike[str],
        metrics: Mapping[str, Any],
        lineage: Mapping[str, Any],
        checksums: Mapping[str, str] | None = None,
    ) -> int:
        """Upload ``model_dir`` as the next version of ``name``; returns its number.

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

        seen, _ = self._scan(name)
        version = max(seen, default=0) + 1
        prefix = self.version_prefix(name, version)
        token = uuid.uuid4().hex
        self.store.write_bytes(f"{prefix}/{CLAIM}", token.encode("ascii"))
        with _tree_of(source, checksums) as tree:
            self.store.upload_tree(tree, f"{prefix}/{MODEL_SUBDIR}")
        self.store.write_bytes(f"{prefix}/{METRICS_FILE}", _dump_json(dict(metrics)))
        self.store.write_bytes(f"{prefix}/{LINEAGE_FILE}", _dump_json(lineage_doc))
        if self.store.read_bytes(f"{prefix}/{CLAIM}").decode("ascii", "replace") != token:
            raise RegistryError(
                f"{self.uri}/{prefix}: another publish of model {name!r} took version "
                f"{version} at the same time; run the deploy again"
            )
        marker = ready_marker(version, created_at, checksums)
        self.store.write_bytes(f"{prefix}/{READY_FILE}", _dump_json(marker))
        return version

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
