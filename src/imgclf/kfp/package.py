"""Compiled pipeline packages: the YAML that upload, run and schedule send to KFP.

The pipeline itself is passed in (a ``GraphComponent`` built by ``pipelines/``); this module
only compiles, reads back and fingerprints the file. ``kfp`` is imported inside functions so
``imgclf --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from imgclf.errors import ConfigError

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent

DEFAULT_PACKAGE = Path("pipelines/training_pipeline.yaml")


def compile_pipeline(pipeline: GraphComponent, out: str | os.PathLike[str]) -> Path:
    """Compile ``pipeline`` to YAML at ``out`` and return the path.

    Written to a temp file beside ``out`` and renamed, so a failed compile never leaves a
    truncated package that upload would send and the KFP UI reject.
    """
    from kfp import compiler

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp.yaml", dir=target.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_package(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a compiled pipeline YAML and return its PipelineSpec (first document) as a dict.

    Parsing it into the ``PipelineSpec`` proto here catches a wrong or truncated file with
    its name in the message, instead of a server-side 400 after upload.
    """
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    package = Path(path)
    if package.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--package {package}: expected a compiled pipeline .yaml file")
    if not package.is_file():
        raise ConfigError(
            f"--package {package}: no such file (create it with `imgclf pipeline compile`)"
        )
    try:
        docs = list(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--package {package}: not valid YAML: {exc}") from None
    spec = docs[0] if docs else None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise ConfigError(
            f"--package {package}: not a compiled KFP pipeline (no root/pipelineInfo)"
        )
    try:
        json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    except json_format.ParseError as exc:
        raise ConfigError(f"--package {package}: not a valid PipelineSpec: {exc}") from None
    return spec


def package_digest(path: str | os.PathLike[str]) -> str:
    """Short sha256 of a package: names versions so the same YAML is recognisable in the UI."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
