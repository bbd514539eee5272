"""Kubeflow Pipelines without the pipeline: compile, send, schedule and run a DAG given to it.

One module per concern: :mod:`.cron` (KFP's six-field cron), :mod:`.params` (typing run
parameters), :mod:`.package` (compiled pipeline files), :mod:`.connection` (where the API is,
its errors), :mod:`.client` (:class:`~.client.KfpSession` over ``kfp.Client``), :mod:`.local`
(the same DAG under ``kfp.local``), :mod:`.local_patches` (what kfp.local gets wrong), and
:mod:`.settings` (cluster settings from params.yaml). Nothing here imports ``pipelines/``:
callers pass the ``@dsl.pipeline`` in, so the library does not depend on the DAG built on it.
"""

from imgclf.kfp.errors import KfpError, RunFailed

__all__ = ["KfpError", "RunFailed"]
