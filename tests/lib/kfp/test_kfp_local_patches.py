"""The kfp.local workaround of :mod:`imgclf.kfp.local_patches`, against the installed kfp.

These tests fail when the workaround has to be looked at again: the installed kfp left
``PATCHED_KFP`` (re-run this file against it, then move the range or delete the patch), the
internal it replaces changed shape (the patch no longer applies), or kfp.local now resolves
a condition on a named output by itself (the patch is no longer needed: delete it).

No ``from __future__ import annotations`` here: KFP reads the components' annotations as types.
"""

import inspect
import io
import logging
import sys
import warnings
from importlib import metadata
from typing import NamedTuple

import pytest
from kfp import dsl
from kfp.local import io as kfp_io
from kfp.local.orchestrator.enhanced_dag_orchestrator import ConditionEvaluator

from imgclf.kfp.local_patches import (
    PATCHED_KFP,
    capture_run_output,
    conditions_on_named_outputs,
    kfp_needs_patches,
)


@dsl.component(base_image="python:3.11")
def _check_gate(go: bool) -> NamedTuple("Gate", [("should_go", bool), ("why", str)]):
    return go, "asked"


@dsl.component(base_image="python:3.11")
def _act() -> str:
    return "acted"


@dsl.pipeline(name="named-gate")
def _gated(go: bool = True) -> None:
    gate = _check_gate(go=go)
    with dsl.If(gate.outputs["should_go"] == True, name="go"):  # noqa: E712
        _act()


def _compiled_condition() -> str:
    """The condition the compiler writes for the gate: what kfp.local has to evaluate."""
    tasks = _gated.pipeline_spec.root.dag.tasks.values()
    (condition,) = [t.trigger_policy.condition for t in tasks if t.trigger_policy.condition]
    return condition


def _store(should_go: bool) -> kfp_io.IOStore:
    """The root DAG's store after check-gate ran (a task name with a dash, like ours)."""
    store = kfp_io.IOStore()
    store.put_task_output("check-gate", "should_go", should_go)
    store.put_task_output("check-gate", "why", "asked")
    return store


def test_installed_kfp_is_one_the_workaround_was_checked_on() -> None:
    version = metadata.version("kfp")
    assert kfp_needs_patches(), (
        f"kfp {version} is outside PATCHED_KFP ({PATCHED_KFP}): run this file against it, "
        "then move the range or delete conditions_on_named_outputs"
    )


def test_the_patched_internal_keeps_its_shape() -> None:
    resolve = ConditionEvaluator.__dict__.get("_resolve_pipeline_channel")
    assert isinstance(resolve, staticmethod), "kfp.local moved _resolve_pipeline_channel"
    assert list(inspect.signature(resolve).parameters) == ["channel_ref", "io_store"]
    with pytest.raises(ValueError):  # what the patch catches to try the next task/output cut
        kfp_io.IOStore().get_task_output("check-gate", "should_go")


def test_kfp_local_alone_still_skips_a_branch_gated_on_a_named_output() -> None:
    condition = _compiled_condition()
    assert "pipelinechannel--check-gate-should_go" in condition
    assert ConditionEvaluator.evaluate_condition(condition, _store(True)) is False, (
        "kfp.local now resolves a condition on a named output: delete conditions_on_named_outputs"
    )


@pytest.mark.parametrize("go", [True, False])
def test_the_patched_condition_follows_the_named_output(go: bool) -> None:
    with conditions_on_named_outputs():
        assert ConditionEvaluator.evaluate_condition(_compiled_condition(), _store(go)) is go


def test_the_patch_is_undone_and_left_out_on_other_kfp_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = ConditionEvaluator.__dict__["_resolve_pipeline_channel"]
    with conditions_on_named_outputs():
        assert ConditionEvaluator.__dict__["_resolve_pipeline_channel"] is not original
    assert ConditionEvaluator.__dict__["_resolve_pipeline_channel"] is original

    monkeypatch.setattr(metadata, "version", lambda _name: "2.18.0")
    with conditions_on_named_outputs():
        assert ConditionEvaluator.__dict__["_resolve_pipeline_channel"] is original


def test_capture_takes_stdout_root_logging_and_warnings_then_gives_them_back() -> None:
    root = logging.getLogger()
    handlers, level, stdout = root.handlers[:], root.level, sys.stdout
    sink = io.StringIO()
    with capture_run_output(sink):
        print("task output")
        logging.info("Skipping conditional task condition-1 (condition evaluated to False)")
        warnings.warn("no GPU here", UserWarning, stacklevel=1)
    assert sink.getvalue().splitlines() == [
        "task output",
        "INFO Skipping conditional task condition-1 (condition evaluated to False)",
        "WARNING UserWarning: no GPU here",
    ]
    assert (root.handlers, root.level, sys.stdout) == (handlers, level, stdout)
