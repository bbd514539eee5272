"""Every component compiles on its own, is documented, and stays a thin adapter.

Thin means: the library is imported inside the function body (compiling needs only kfp, and
the image runs the library), the image comes from one constant, and every input and output
has a docstring entry that KFP shows in its UI (STYLE rule 7).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.pipeline_spec import pipeline_spec_pb2

from components import _image
from imgclf import config
from imgclf.config import DeployConfig

STEPS = ("ingest", "validate", "check_retrain", "train", "evaluate", "deploy")
# The library call each component adapts to (the rest of the body is I/O).
CALLS = {
    "ingest": "step.run(",
    "validate": "step.run(",
    "check_retrain": "should_retrain(",
    "train": "step.run(",
    "evaluate": "step.run(",
    "deploy": "step.run(",
}
OUTPUT_TYPES = {
    "ingest": {"dataset": "system.Dataset"},
    "validate": {
        "report": "system.Artifact",
        "data_docs": "system.HTML",
        "metrics": "system.Metrics",
    },
    "check_retrain": {},
    "train": {
        "trained_model": "system.Model",
        "metrics": "system.Metrics",
        "training_curves": "system.HTML",
    },
    "evaluate": {
        "evaluation": "system.Artifact",
        "metrics": "system.Metrics",
        "confusion_matrix": "system.ClassificationMetrics",
        "model_card": "system.Markdown",
        "misclassified": "system.HTML",
    },
    "deploy": {"inference_service": "system.Artifact", "smoke_report": "system.Markdown"},
}
OUTPUT_PARAMETERS = {
    "check_retrain": {"should_retrain": "BOOLEAN", "reason": "STRING"},
    "evaluate": {"passed": "BOOLEAN", "accuracy": "NUMBER_DOUBLE"},
    "deploy": {"version": "NUMBER_INTEGER", "promoted": "BOOLEAN"},
}

# The config sections each component builds from its parameters.
SECTIONS: dict[str, tuple[type, ...]] = {
    "ingest": (config.IngestConfig,),
    "validate": (config.ValidateConfig,),
    "check_retrain": (config.RegistryConfig,),
    "train": (config.TrainConfig,),
    "evaluate": (config.EvaluateConfig, config.RegistryConfig),
    "deploy": (config.DeployConfig, config.RegistryConfig),
}
# Parameters named after their config field with a qualifier: the pipeline's run parameters
# share one flat list in the KFP UI, where ``seed`` or ``uri`` alone would not say whose.
QUALIFIED = {
    "split_train": (config.IngestConfig, "split"),
    "split_val": (config.IngestConfig, "split"),
    "split_test": (config.IngestConfig, "split"),
    "split_seed": (config.IngestConfig, "seed"),
    "train_image_size": (config.TrainConfig, "image_size"),
    "train_seed": (config.TrainConfig, "seed"),
    "eval_batch_size": (config.EvaluateConfig, "batch_size"),
    "registry_uri": (config.RegistryConfig, "uri"),
    "registry_alias": (config.RegistryConfig, "alias"),
    "serving_image": (config.DeployConfig, "image"),
    "apply_inference_service": (config.DeployConfig, "apply"),
    "checkpoint_root": (config.TrainConfig, "checkpoint_dir"),
}
# A per-run decision, the run's identity, and the pod's GPU count (a compile-time literal):
# not settings of any section.
NOT_CONFIG = {"force", "run_id", "nproc_per_node"}


def _component(step: str) -> Any:
    return getattr(importlib.import_module(f"components.{step}.component"), step)


def _compile(step: str, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / f"{step}.yaml"
    compiler.Compiler().compile(_component(step), str(path))
    (doc,) = yaml.safe_load_all(path.read_text(encoding="utf-8"))
    json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    return doc


@pytest.mark.parametrize("step", STEPS)
def test_component_compiles_alone(step: str, tmp_path: Path) -> None:
    doc = _compile(step, tmp_path)
    (component,) = doc["components"].values()
    outputs = component.get("outputDefinitions", {})
    artifacts = {
        name: spec["artifactType"]["schemaTitle"]
        for name, spec in outputs.get("artifacts", {}).items()
    }
    assert artifacts == OUTPUT_TYPES[step]
    parameters = {k: v["parameterType"] for k, v in outputs.get("parameters", {}).items()}
    assert parameters == OUTPUT_PARAMETERS.get(step, {})
    (executor,) = doc["deploymentSpec"]["executors"].values()
    container = executor["container"]
    assert container["image"] == _image.IMAGE
    body = container["command"][-1]
    assert "from imgclf" in body and CALLS[step] in body
    # install_kfp_package=False: the image already has kfp; nothing is pip-installed at start.
    assert "pip install" not in " ".join(container["command"])


@pytest.mark.parametrize("step", STEPS)
def test_every_input_and_output_is_documented(step: str, tmp_path: Path) -> None:
    component = _component(step)
    doc = inspect.getdoc(component.python_func) or ""
    signature = inspect.signature(component.python_func)
    names = list(signature.parameters)
    returns = signature.return_annotation
    names += list(getattr(returns, "_fields", ()))
    documented = set(re.findall(r"^    (\w+): ", doc, flags=re.MULTILINE))
    missing = [name for name in names if name not in documented]
    assert missing == [], f"{step}: no docstring entry for {missing}"
    # KFP turned the entries into descriptions of the inputs shown in its UI.
    (spec,) = _compile(step, tmp_path)["components"].values()
    inputs = spec["inputDefinitions"]
    for kind in ("parameters", "artifacts"):
        for name, definition in inputs.get(kind, {}).items():
            assert definition.get("description"), f"{step}.{name} has no description"


@pytest.mark.parametrize("step", STEPS)
def test_parameters_are_named_after_their_config_fields(step: str, tmp_path: Path) -> None:
    (spec,) = _compile(step, tmp_path)["components"].values()
    fields = {(cls, field.name) for cls in SECTIONS[step] for field in dataclasses.fields(cls)}
    for name in set(spec["inputDefinitions"].get("parameters", {})) - NOT_CONFIG:
        qualified = QUALIFIED.get(name)
        if qualified is None:
            assert any(name == field for _, field in fields), f"{step}.{name}: no such field"
        else:
            assert qualified in fields, f"{step}.{name}: {qualified} is not its field"


def test_one_image_for_all_components() -> None:
    assert DeployConfig().image == _image.DEFAULT_IMAGE
    images = {_component(step).component_spec.implementation.container.image for step in STEPS}
    assert images == {_image.IMAGE}


def test_image_is_chosen_at_compile_time(tmp_path: Path) -> None:
    out = tmp_path / "train.yaml"
    code = (
        "import sys; from kfp import compiler; from components.train.component import train; "
        "compiler.Compiler().compile(train, sys.argv[1])"
    )
    env = {**os.environ, "IMGCLF_IMAGE": "registry.example.com/imgclf@sha256:" + "0" * 64}
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (doc,) = yaml.safe_load_all(out.read_text(encoding="utf-8"))
    (executor,) = doc["deploymentSpec"]["executors"].values()
    assert executor["container"]["image"] == env["IMGCLF_IMAGE"]


def test_compiling_components_imports_no_library_code() -> None:
    code = (
        "import sys, importlib\n"
        f"for step in {STEPS!r}:\n"
        "    importlib.import_module(f'components.{step}.component')\n"
        "loaded = sorted(m for m in sys.modules if m == 'imgclf' or m.startswith('imgclf.')"
        " or m in ('torch', 'great_expectations'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_packages_import_from_another_directory(tmp_path: Path) -> None:
    """components/ and pipelines/ ship in the distribution, not only in the repo checkout."""
    code = (
        "import components.train.component as c, pipelines.training_pipeline as p; "
        "print(c.__name__, p.PIPELINE_NAME)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["components.train.component", "imgclf-training"]
