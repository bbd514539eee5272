"""What kfp.local needs changed to run this project's DAG, and only on the kfp it was checked on.

Two interventions, both undone when the run ends:

- :func:`conditions_on_named_outputs` replaces a kfp.local internal. Since kfp 2.16 (when
  ``kfp.local`` gained ``dsl.If`` through ``orchestrator/enhanced_dag_orchestrator.py``),
  ``ConditionEvaluator._resolve_pipeline_channel`` reads ``pipelinechannel--<task>-<output>``
  as an upstream output only for a task's single ``Output`` (``-Output``) or a ``--``
  spelling the compiler does not write; any other name is looked up among the pipeline's
  inputs, not found, and the condition evaluates to False. The training DAG's gates test
  named outputs (check-retrain's ``should_retrain``, evaluate's ``passed``), so kfp.local
  would skip training on every run. The compiled condition is right (the KFP backend
  resolves it); only local runs need this. It is applied for :data:`PATCHED_KFP` only:
  ``tests/lib/kfp/test_kfp_local_patches.py`` fails when the installed kfp leaves that range, when
  its internals change shape, or when kfp.local resolves such a condition by itself.
- :func:`capture_run_output` takes over stdout and the root logger for the run. kfp.local
  prints progress and task output to ``sys.stdout`` but logs "Skipping ..." decisions with
  plain ``logging.info`` on the root logger, outside its own logging context, where the
  root's level drops them or the CLI's handler prints them to stderr. Both streams are
  needed in every kfp version, so this one is not gated.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from importlib import metadata
from typing import Any, Protocol

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# kfp releases whose kfp.local misreads a condition on a named output (checked against the
# kubeflow/pipelines sources of 2.16.0, 2.16.1, 2.17.0 and master, and run on 2.17.3).
PATCHED_KFP = SpecifierSet(">=2.16,<2.18")


def kfp_needs_patches(version: str | None = None) -> bool:
    """Whether kfp ``version`` (default: the installed one) is in :data:`PATCHED_KFP`."""
    return Version(version or metadata.version("kfp")) in PATCHED_KFP


class TextSink(Protocol):
    """What stands in for stdout during a run: text in, nothing back."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


@contextlib.contextmanager
def conditions_on_named_outputs() -> Iterator[None]:
    """Let kfp.local's ``dsl.If`` read a named output of an upstream task.

    During the run, a condition's ``pipelinechannel--<task>-<output>`` is looked up among
    the upstream task outputs first (trying each ``-`` as the task/output boundary, since
    both names may contain dashes); anything else falls through to kfp.local's own
    resolution unchanged. Outside :data:`PATCHED_KFP` kfp.local runs as it is.
    """
    if not kfp_needs_patches():
        yield
        return
    from kfp.local.orchestrator.enhanced_dag_orchestrator import ConditionEvaluator

    original = ConditionEvaluator.__dict__["_resolve_pipeline_channel"]

    def resolve(channel_ref: str, io_store: Any) -> Any:
        name = channel_ref.removeprefix("pipelinechannel--")
        for cut in (i for i, ch in enumerate(name) if ch == "-"):
            try:
                return io_store.get_task_output(name[:cut], name[cut + 1 :])
            except ValueError:
                continue
        return original.__func__(channel_ref, io_store)

    ConditionEvaluator._resolve_pipeline_channel = staticmethod(resolve)
    try:
        yield
    finally:
        ConditionEvaluator._resolve_pipeline_channel = original


@contextlib.contextmanager
def capture_run_output(stream: TextSink) -> Iterator[None]:
    """Route stdout, the root logger (kfp.local's "Skipping ..." lines) and warnings to ``stream``.

    kfp.local warns that the tasks' image is not a Python image and that GPU and CPU
    requests have no effect here; both are true of every local run, so they go to the run's
    log instead of the terminal.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(stream), warnings.catch_warnings():
            warnings.showwarning = lambda message, category, *_args, **_kw: stream.write(
                f"WARNING {category.__name__}: {message}\n"
            )
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
