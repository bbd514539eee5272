"""Deploy step: publish a model that passed the quality gate, move the alias, render KServe.

Inputs are the model dir (train) and the eval dir (evaluate). When ``metrics.json`` says
``passed`` (the gate's reasons are in ``report.json``), the model becomes a new registry
version, ``registry.alias`` (``production``) moves to it, and ``inferenceservice.yaml`` is
rendered for that version. When it did not pass, nothing is published or promoted;
``deploy.json`` still records why (DVC and KFP need the output), and the manifest written is
the one of the *current* alias version if there is one, so ``kubectl apply -f`` on the
output is always safe: it re-asserts what is serving instead of deploying the rejected
model, and is absent when nothing was ever promoted.

Reruns are idempotent: the weights' sha256 identifies the model, so when the alias already
holds it nothing is published, and when an earlier run published it but stopped before
moving the alias, that version is promoted instead of publishing a duplicate.

``deploy.json``: ``promoted`` (the alias holds this model after the step), ``published`` (a
new version was written), ``version`` (what the alias holds afterwards, the version the
manifest serves; null if none), ``alias``, ``model_name``, ``model_sha256``, ``registry``,
``storage_uri``, ``manifest`` (file name or null), ``reasons`` (from evaluation, plus why
nothing was promoted), and ``comment`` when the storage URI only works on this machine.

Before anything is published, the candidate is smoke-tested on the real model server
(:mod:`imgclf.serving.smoke`): ``smoke`` in ``deploy.json`` and ``smoke.md`` hold the report,
and a candidate that fails it is not promoted. With ``deploy.canary_percent`` > 0 and a
version already serving, the new version becomes the alias's ``canary`` (``canary`` in
``deploy.json``) and the manifest splits the traffic; ``imgclf registry promote --finish``
completes it. In a cluster (``deploy.apply``), the manifest is applied and the step waits for
``Ready``; if it never comes, the previous InferenceService spec and the previous alias are
restored, ``deploy.json`` says so (``applied``), and the step fails.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from imgclf.config import DeployConfig, RegistryConfig, ServeConfig, to_dict
from imgclf.contracts import (
    WEIGHTS_FILE,
    model_dir_checksums,
    read_eval_metrics,
    read_eval_report,
    read_model_json,
)
from imgclf.errors import DataError, DeployError
from imgclf.fsutil import atomic_dir, write_json, write_text
from imgclf.registry import ModelRegistry, VersionInfo
from imgclf.serving import manifest as kserve
from imgclf.storage import is_remote

log = logging.getLogger(__name__)

MANIFEST_FILE = "inferenceservice.yaml"
SMOKE_REPORT = "smoke.md"
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
    cfg: DeployConfig,
    registry: RegistryConfig,
    info: VersionInfo,
    uri: str,
    canary_percent: int | None = None,
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
        canary_percent=canary_percent,
    )


def manifest_for(
    cfg: DeployConfig,
    registry: RegistryConfig,
    reg: ModelRegistry,
    version: int,
    canary_percent: int | None = None,
) -> tuple[dict[str, Any], str, str | None]:
    """(InferenceService, storage URI, local-only comment) serving ``version``; with
    ``canary_percent`` it takes that share of the traffic and the previous revision the rest."""
    info = reg.get(registry.model_name, version)
    uri, comment = storage_uri(cfg, registry, registry.model_name, version)
    return _render(cfg, registry, info, uri, canary_percent), uri, comment


def manifest_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as YAML for ``kubectl apply -f``."""
    return kserve.dump_yaml(manifest)


def should_apply(cfg: DeployConfig, kubeconfig: str | None = None) -> bool:
    """``deploy.apply``: true, false, or auto (a kubeconfig or in-cluster account exists)."""
    from imgclf.serving import cluster

    if isinstance(cfg.apply, bool):
        return cfg.apply
    return cluster.cluster_configured(kubeconfig)


def apply_manifest(
    cfg: DeployConfig, manifest: dict[str, Any], kubeconfig: str | None = None
) -> dict[str, Any]:
    """Apply ``manifest`` and wait for Ready; DeployError (after the previous spec is
    restored) when it does not come. Returns what happened, for ``deploy.json``."""
    from imgclf.serving import cluster

    result = cluster.apply_and_wait(
        manifest, client=cluster.api_client(kubeconfig), timeout_s=cfg.ready_timeout_s
    )
    log.info(
        "InferenceService %s/%s %s and Ready after %.0f s",
        result.namespace, result.name, result.action, result.waited_s,
    )  # fmt: skip
    return {"action": result.action, "ready": True, "waited_s": round(result.waited_s, 1)}


def _publish_and_promote(
    reg: ModelRegistry,
    registry: RegistryConfig,
    model_dir: Path,
    metrics: dict[str, Any],
    reasons: list[str],
    model_json: dict[str, Any],
    checksums: dict[str, str],
    canary_percent: int = 0,
) -> tuple[int, bool, bool, list[str], dict[str, Any] | None]:
    """(version the alias holds afterwards, published?, promoted?, reasons, canary) for a
    passed model. With ``canary_percent`` > 0 and another version serving, the model becomes
    the alias's canary instead (``canary``: ``{"version", "percent"}``; not promoted yet).

    Weights already in the registry are reused rather than published twice. Weights that
    a rollback took off the alias are not put back by a rerun: that needs an explicit
    ``imgclf registry promote``. ``checksums`` (every file of the model dir) identify the
    model and go into the registry's marker without hashing the files again. ``metrics``
    (the flat ``metrics.json``) is what the registry records; ``reasons`` are the gate's.
    """
    name, alias = registry.model_name, registry.alias
    model_sha256 = checksums[WEIGHTS_FILE]
    reasons = [str(r) for r in reasons]
    alias_doc = reg.alias_doc(name, alias) or {}
    current = alias_doc.get("version")
    existing = reg.find_by_sha256(name, model_sha256)
    if existing is not None and existing.version == current:
        log.info("%s version %d (same weights) already holds alias %r", name, current, alias)
        return existing.version, False, True, reasons, None
    if existing is not None and alias_doc.get("rolled_back_from") == existing.version:
        reasons.append(
            f"version {existing.version} has the same weights and was rolled back from "
            f"alias {alias!r}; promote it explicitly with `imgclf registry promote` if wanted"
        )
        log.warning("not promoting %s: %s", name, reasons[-1])
        return int(current), False, False, reasons, None
    published = existing is None
    if existing is None:
        lineage = _lineage(model_json, model_sha256, model_dir)
        version = reg.publish(name, model_dir, metrics, lineage, checksums=checksums)
        log.info("published %s version %d to %s", name, version, reg.uri)
    else:
        version = existing.version
        log.info("reusing %s version %d (same weights, not yet promoted)", name, version)
    if canary_percent > 0 and current is not None:
        reg.start_canary(name, version, canary_percent, alias)
        log.info(
            "%s version %d is the canary of alias %r (version %d): %d%% of the traffic",
            name, version, alias, current, canary_percent,
        )  # fmt: skip
        return (
            int(current),
            published,
            False,
            reasons,
            {
                "version": version,
                "percent": canary_percent,
            },
        )
    reg.promote(name, version, alias)
    log.info("moved %s alias %r from %s to %d", name, alias, current, version)
    return version, published, True, reasons, None


def _smoke(
    cfg: DeployConfig,
    serve: ServeConfig,
    registry: RegistryConfig,
    model_dir: Path,
    eval_dir: Path,
    dataset_dir: Path | None,
) -> dict[str, Any]:
    if cfg.smoke_samples == 0:
        log.warning("deploy.smoke_samples=0: promoting without a smoke test on the server")
        return {"passed": True, "skipped": True, "reasons": []}
    if dataset_dir is None:
        raise DataError("deploy: the smoke test needs the dataset dir (its test split images)")
    from imgclf.data.shard_reader import read_images
    from imgclf.data.shard_source import use_shards
    from imgclf.serving.smoke import run_smoke_test

    reader = None
    if use_shards(dataset_dir):  # no images/ tree: the test images come from the shards
        reader = functools.partial(read_images, dataset_dir, "test")
    log.info("smoke test: serving the candidate on loopback, %d test images", cfg.smoke_samples)
    report = run_smoke_test(
        model_dir,
        dataset_dir,
        eval_dir,
        name=registry.model_name,
        deploy=cfg,
        serve=serve,
        read_images=reader,
    )
    if report["passed"]:
        log.info("smoke test passed: p95 %.1f ms, answers equal evaluate's", report["p95_ms"])
    else:
        log.warning("smoke test failed: %s", "; ".join(report["reasons"]))
    return report


def run(
    cfg: DeployConfig,
    registry: RegistryConfig,
    *,
    model_dir: Path,
    eval_dir: Path,
    out_dir: Path,
    dataset_dir: Path | None = None,
    serve: ServeConfig | None = None,
    kubeconfig: str | None = None,
) -> dict[str, Any]:
    """Smoke-test, publish and promote (or canary) the model if evaluation passed; write
    ``deploy.json``, ``smoke.md`` and the InferenceService manifest to ``out_dir``; apply it
    in a cluster. Returns the ``deploy.json`` content.

    ``dataset_dir`` holds the test images the smoke test sends (required unless
    ``deploy.smoke_samples`` is 0). DeployError when the cluster did not take the model
    (after restoring the previous spec and alias; ``deploy.json`` is written first).
    """
    model_dir, eval_dir, out_dir = Path(model_dir), Path(eval_dir), Path(out_dir)
    serve = serve or ServeConfig()
    metrics = read_eval_metrics(eval_dir)
    gate_reasons = read_eval_report(eval_dir)["reasons"]
    model_json = read_model_json(model_dir)
    checksums = model_dir_checksums(model_dir)
    if WEIGHTS_FILE not in checksums:
        raise DataError(f"{model_dir / WEIGHTS_FILE}: model weights not found")
    model_sha256 = checksums[WEIGHTS_FILE]
    name, alias = registry.model_name, registry.alias
    reg = ModelRegistry.open(registry.uri)
    before = reg.alias_doc(name, alias)

    smoke: dict[str, Any] | None = None
    canary: dict[str, Any] | None = None
    if metrics["passed"]:
        smoke = _smoke(cfg, serve, registry, model_dir, eval_dir, dataset_dir)
    if metrics["passed"] and smoke is not None and smoke["passed"]:
        target, published, promoted, reasons, canary = _publish_and_promote(
            reg,
            registry,
            model_dir,
            metrics,
            gate_reasons,
            model_json,
            checksums,
            cfg.canary_percent,
        )
    else:
        reasons = list(gate_reasons or ["evaluation did not pass"])
        if smoke is not None:
            reasons += [f"smoke test: {r}" for r in smoke["reasons"]]
        target, published, promoted = reg.alias(name, alias), False, False
        log.warning("not promoting %s: %s", name, "; ".join(map(str, reasons)))

    manifest = None
    uri = comment = None
    if canary is not None:
        manifest, uri, comment = manifest_for(
            cfg, registry, reg, canary["version"], canary["percent"]
        )
    elif target is not None:
        manifest, uri, comment = manifest_for(cfg, registry, reg, target)
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
        "smoke": smoke,
        "canary": canary,
        "applied": None,
    }
    if comment:
        result["comment"] = comment
    failure: DeployError | None = None
    if manifest is not None and should_apply(cfg, kubeconfig):
        try:
            result["applied"] = apply_manifest(cfg, manifest, kubeconfig)
        except DeployError as exc:
            reg.restore_alias(name, alias, before)
            failure = exc
            restored = None if before is None else int(before["version"])
            # The output must re-assert what serves now, not the rejected rollout.
            manifest, uri, comment = (
                (None, None, None)
                if restored is None
                else manifest_for(cfg, registry, reg, restored)
            )
            result.update(
                {
                    "promoted": False,
                    "canary": None,
                    "applied": {"error": str(exc)},
                    "version": restored,
                    "storage_uri": uri,
                    "manifest": MANIFEST_FILE if manifest is not None else None,
                    "reasons": [*reasons, f"rollout failed, alias {alias!r} restored: {exc}"],
                }
            )
            result.pop("comment", None)
            if comment:
                result["comment"] = comment
    elif manifest is not None:
        log.info(
            "no Kubernetes cluster configured: wrote %s (apply it with kubectl apply -f)",
            out_dir / MANIFEST_FILE,
        )
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "deploy.json", result)
        write_json(
            tmp / "config.json",
            {"deploy": to_dict(cfg), "registry": to_dict(registry), "serve": to_dict(serve)},
        )
        if smoke is not None and not smoke.get("skipped"):
            from imgclf.serving.smoke import markdown

            write_text(tmp / SMOKE_REPORT, markdown(smoke, name=name))
        if manifest is not None:
            write_text(tmp / MANIFEST_FILE, manifest_yaml(manifest))
    if failure is not None:
        raise failure
    return result
