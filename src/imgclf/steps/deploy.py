"""Deploy step: publish a model that passed the quality gate, move the alias, render KServe.

Inputs are the model dir (train) and the eval dir (evaluate). When ``metrics.json`` says
``passed``, the model becomes a new registry version, ``registry.alias`` (``production``)
moves to it, and ``inferenceservice.yaml`` is rendered for that version. When it did not
pass, nothing is published or promoted; ``deploy.json`` still records why (DVC and KFP need
the output), and the manifest written is the one of the *current* alias version if there is
one, so ``kubectl apply -f`` on the output is always safe: it re-asserts what is serving
instead of deploying the rejected model, and is absent when nothing was ever promoted.

Reruns are idempotent: the weights' sha256 identifies the model, so when the alias already
holds it nothing is published, and when an earlier run published it but stopped before
moving the alias, that version is promoted instead of publishing a duplicate.

``deploy.json``: ``promoted`` (the alias holds this model after the step), ``published`` (a
new version was written), ``version`` (what the alias holds afterwards, the version the
manifest serves; null if none), ``alias``, ``model_name``, ``model_sha256``, ``registry``,
``storage_uri``, ``manifest`` (file name or null), ``reasons`` (from evaluation, plus why
nothing was promoted), and ``comment`` when the storage URI only works on this machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from imgclf.config import DeployConfig, RegistryConfig, to_dict
from imgclf.contracts import WEIGHTS_FILE, model_dir_checksums, read_eval_metrics, read_model_json
from imgclf.errors import DataError
from imgclf.fsutil import atomic_dir, write_json, write_text
from imgclf.registry import ModelRegistry, VersionInfo
from imgclf.serving import manifest as kserve
from imgclf.storage import is_remote

log = logging.getLogger(__name__)

MANIFEST_FILE = "inferenceservice.yaml"
LOCAL_ONLY_COMMENT = (
    "storage_uri is a file:// path on this machine: the manifest is for local use only. "
    "Set registry.uri to s3://... or deploy.storage_uri_prefix (e.g. pvc://imgclf-models) "
    "for a cluster."
)


def storage_uri(
    cfg: DeployConfig, registry: RegistryConfig, name: str, version: int
) -> tuple[str, str | None]:
    """Where KServe's storage initializer fetches the version from, and a comment if local.

    An S3 registry is served straight from its bucket; a local registry through
    ``deploy.storage_uri_prefix`` (the same tree mounted in the cluster, e.g. a PVC), else
    its ``file://`` path, which only a local model server can read.
    """
    key = ModelRegistry.model_prefix(name, version)
    if is_remote(registry.uri):
        return f"{registry.uri.rstrip('/')}/{key}", None
    if cfg.storage_uri_prefix:
        return f"{cfg.storage_uri_prefix.rstrip('/')}/{key}", None
    return f"{Path(registry.uri).resolve().as_uri()}/{key}", LOCAL_ONLY_COMMENT


def _lineage(model_json: dict[str, Any], model_sha256: str, model_dir: Path) -> dict[str, Any]:
    return {
        "dataset_hash": model_json.get("dataset_hash"),
        "git_commit": model_json.get("git_commit"),
        "params": model_json.get("params"),
        "source": model_json.get("source") or str(model_dir.resolve()),
        "architecture": model_json.get("architecture"),
        "classes": model_json.get("classes"),
        "trained_at": model_json.get("created_at"),
        "torch_version": model_json.get("torch_version"),
        "model_sha256": model_sha256,
    }


def _render(
    cfg: DeployConfig, registry: RegistryConfig, info: VersionInfo, uri: str
) -> dict[str, Any]:
    annotations = {"imgclf.io/registry": registry.uri}
    if info.model_sha256:
        annotations["imgclf.io/model-sha256"] = info.model_sha256
    if info.dataset_hash:
        annotations["imgclf.io/dataset-hash"] = str(info.dataset_hash)
    return kserve.render_inference_service(
        name=registry.model_name,
        namespace=cfg.namespace,
        storage_uri=uri,
        service_account=cfg.service_account,
        image=cfg.image,
        model_version=info.version,
        annotations=annotations,
    )


def _publish_and_promote(
    reg: ModelRegistry,
    registry: RegistryConfig,
    model_dir: Path,
    metrics: dict[str, Any],
    model_json: dict[str, Any],
    checksums: dict[str, str],
) -> tuple[int, bool, bool, list[str]]:
    """(version the alias holds afterwards, published?, promoted?, reasons) for a passed model.

    Weights already in the registry are reused rather than published twice. Weights that
    a rollback took off the alias are not put back by a rerun: that needs an explicit
    ``imgclf registry promote``. ``checksums`` (every file of the model dir) identify the
    model and go into the registry's marker without hashing the files again.
    """
    name, alias = registry.model_name, registry.alias
    model_sha256 = checksums[WEIGHTS_FILE]
    reasons = [str(r) for r in metrics.get("reasons") or []]
    alias_doc = reg.alias_doc(name, alias) or {}
    current = alias_doc.get("version")
    existing = reg.find_by_sha256(name, model_sha256)
    if existing is not None and existing.version == current:
        log.info("%s version %d (same weights) already holds alias %r", name, current, alias)
        return existing.version, False, True, reasons
    if existing is not None and alias_doc.get("rolled_back_from") == existing.version:
        reasons.append(
            f"version {existing.version} has the same weights and was rolled back from "
            f"alias {alias!r}; promote it explicitly with `imgclf registry promote` if wanted"
        )
        log.warning("not promoting %s: %s", name, reasons[-1])
        return int(current), False, False, reasons
    published = existing is None
    if existing is None:
        lineage = _lineage(model_json, model_sha256, model_dir)
        version = reg.publish(name, model_dir, metrics, lineage, checksums=checksums)
        log.info("published %s version %d to %s", name, version, reg.uri)
    else:
        version = existing.version
        log.info("reusing %s version %d (same weights, not yet promoted)", name, version)
    reg.promote(name, version, alias)
    log.info("moved %s alias %r from %s to %d", name, alias, current, version)
    return version, published, True, reasons


def run(
    cfg: DeployConfig,
    registry: RegistryConfig,
    *,
    model_dir: Path,
    eval_dir: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Publish and promote the model if evaluation passed; write ``deploy.json`` and the
    InferenceService manifest to ``out_dir``. Returns the ``deploy.json`` content."""
    model_dir, eval_dir, out_dir = Path(model_dir), Path(eval_dir), Path(out_dir)
    metrics = read_eval_metrics(eval_dir)
    model_json = read_model_json(model_dir)
    checksums = model_dir_checksums(model_dir)
    if WEIGHTS_FILE not in checksums:
        raise DataError(f"{model_dir / WEIGHTS_FILE}: model weights not found")
    model_sha256 = checksums[WEIGHTS_FILE]
    name, alias = registry.model_name, registry.alias
    reg = ModelRegistry.open(registry.uri)

    if metrics["passed"]:
        target, published, promoted, reasons = _publish_and_promote(
            reg, registry, model_dir, metrics, model_json, checksums
        )
    else:
        reasons = list(metrics.get("reasons") or ["evaluation did not pass"])
        target, published, promoted = reg.alias(name, alias), False, False
        log.warning("not promoting %s: %s", name, "; ".join(map(str, reasons)))

    manifest = None
    uri = comment = None
    if target is not None:
        info = reg.get(name, target)
        uri, comment = storage_uri(cfg, registry, name, target)
        manifest = _render(cfg, registry, info, uri)
    result: dict[str, Any] = {
        "promoted": promoted,
        "published": published,
        "version": target,
        "alias": alias,
        "model_name": name,
        "model_sha256": model_sha256,
        "registry": reg.uri,
        "storage_uri": uri,
        "manifest": MANIFEST_FILE if manifest is not None else None,
        "reasons": reasons,
    }
    if comment:
        result["comment"] = comment
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "deploy.json", result)
        write_json(tmp / "config.json", {"deploy": to_dict(cfg), "registry": to_dict(registry)})
        if manifest is not None:
            write_text(tmp / MANIFEST_FILE, kserve.dump_yaml(manifest))
    return result
