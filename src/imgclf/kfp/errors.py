"""The two errors of talking to KFP, shared by the REST client and local runs."""

from __future__ import annotations

from imgclf.errors import ImgclfError


class KfpError(ImgclfError):
    """The KFP API server could not be reached, refused a request, or lacks an object."""


class RunFailed(KfpError):
    """A pipeline run ended FAILED, CANCELED or ERROR (or a local run's task failed)."""

    exit_code = 4
