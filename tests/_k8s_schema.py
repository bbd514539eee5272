"""Validate custom resources offline against the upstream CRDs in ``../shared/schemas``.

``validate_custom_resource(obj, crd_path)`` checks a manifest the way an API server with
strict field validation (``kubectl apply --validate=strict``) would, without a cluster:

- ``apiVersion``/``kind`` must name a served version of the CRD;
- the body must match that version's ``openAPIV3Schema``. In a structural schema an object
  whose fields are listed accepts no others (the server would prune or, in strict mode,
  reject them) unless it says ``x-kubernetes-preserve-unknown-fields`` or
  ``additionalProperties``, so every such object gets ``additionalProperties: false``;
  ``x-kubernetes-int-or-string`` is already spelled out as ``anyOf`` in published CRDs;
- ``metadata`` (which CRDs leave as a bare ``type: object``) is checked against the
  ObjectMeta schema that ``kubernetes-validate`` ships, plus the name and label syntax
  rules the API server enforces.

The schemas folder is ``IMGCLF_SHARED_DIR/schemas`` when that variable is set, else the
``shared/`` folder beside the repository (CI has it at ``../shared`` too).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

SHARED_ENV = "IMGCLF_SHARED_DIR"
OBJECT_META_REF = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def shared_dir() -> Path:
    """The shared folder (DESIGN.md, schemas/): ``$IMGCLF_SHARED_DIR`` or ``../shared``."""
    override = os.environ.get(SHARED_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared"


def schema_path(filename: str) -> Path:
    """A file in ``<shared>/schemas``, e.g. ``kserve.serving.kserve.io_inferenceservices.yaml``."""
    return shared_dir() / "schemas" / filename


def _k8s_definitions() -> dict[str, Any]:
    """kubernetes-validate's strict ``_definitions.json`` of the newest Kubernetes it ships."""
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    strict = [d for d in root.iterdir() if d.name.endswith("-local-strict")]

    def version_key(d: Any) -> tuple[int, ...]:
        return tuple(int(x) for x in d.name[1:].split("-")[0].split("."))

    newest = max(strict, key=version_key)
    return json.loads((newest / "_definitions.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    defs = _k8s_definitions()
    return Registry().with_resource(defs["$id"], Resource.from_contents(defs))


def _is_object_meta_slot(key: str, schema: Mapping[str, Any]) -> bool:
    return key == "metadata" and schema.get("type") == "object" and "properties" not in schema


def _strict(schema: Any) -> Any:
    """Copy of a structural schema with unknown fields forbidden and metadata resolved."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {
                name: {"$ref": OBJECT_META_REF} if _is_object_meta_slot(name, sub) else _strict(sub)
                for name, sub in value.items()
            }
        else:
            out[key] = _strict(value)
    is_object = schema.get("type") == "object"
    if (
        is_object
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=8)
def _load_crd(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=16)
def strict_schema(crd_path: str, version: str) -> dict[str, Any]:
    """The strict JSON schema of ``version`` of the CRD at ``crd_path`` (cached)."""
    crd = _load_crd(crd_path)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version and entry.get("served", False):
            # _strict builds new dicts, so the cached CRD is never modified.
            return _strict(entry["schema"]["openAPIV3Schema"])
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    raise jsonschema.ValidationError(
        f"{crd_path}: version {version!r} is not served (served: {', '.join(served)})"
    )


def _meta_errors(obj: Mapping[str, Any], namespaced: bool) -> Iterator[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        yield "metadata: required"
        return
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        yield f"metadata.name: {name!r} is not a DNS-1123 subdomain"
    namespace = meta.get("namespace")
    if namespace is not None and not namespaced:
        yield "metadata.namespace: set on a cluster-scoped resource"
    if namespace is not None and (len(namespace) > 63 or not _DNS1123_LABEL.match(namespace)):
        yield f"metadata.namespace: {namespace!r} is not a DNS-1123 label"
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            prefix, _, short = key.rpartition("/")
            if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
                yield f"metadata.{field}: key {key!r} has an invalid prefix"
            if len(short) > 63 or not _QUALIFIED_NAME.match(short):
                yield f"metadata.{field}: key {key!r} is not a qualified name"
            if field == "labels" and (len(str(value)) > 63 or not _LABEL_VALUE.match(str(value))):
                yield f"metadata.labels: value {value!r} of {key!r} is not a valid label value"


def validate_custom_resource(obj: Mapping[str, Any], crd_path: str | os.PathLike[str]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``obj`` is a valid instance of the CRD.

    ``obj`` is the manifest as plain data (what ``yaml.safe_load`` of the file gives).
    """
    crd = _load_crd(str(crd_path))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    api_version = str(obj.get("apiVersion", ""))
    obj_group, _, version = api_version.rpartition("/")
    if obj_group != group or obj.get("kind") != kind:
        raise jsonschema.ValidationError(
            f"apiVersion/kind {api_version}/{obj.get('kind')} is not {group}/<version> {kind}"
        )
    schema = strict_schema(str(crd_path), version)
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    error = jsonschema.exceptions.best_match(validator.iter_errors(dict(obj)))
    if error is not None:
        raise error
    problems = list(_meta_errors(obj, crd["spec"].get("scope") == "Namespaced"))
    if problems:
        raise jsonschema.ValidationError("; ".join(problems))
