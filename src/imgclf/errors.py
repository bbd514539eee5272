"""User-facing errors.

Anything raised as an :class:`ImgclfError` is a problem the user can fix (a bad setting, a bad
file, a failed check). The CLI prints its message on one line and exits non-zero without a
traceback; any other exception is a bug and keeps its traceback.
"""


class ImgclfError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 1


class ConfigError(ImgclfError):
    """A setting in params.yaml, a flag or an environment variable is invalid."""

    exit_code = 2


class DataError(ImgclfError):
    """An input dataset, archive or image cannot be used."""


class ValidationFailed(ImgclfError):
    """A blocking data expectation failed; the pipeline must stop before training."""

    exit_code = 3


class StorageError(ImgclfError):
    """The artifact store (local or S3) could not be read or written."""


class RegistryError(ImgclfError):
    """The model registry is missing a version, an alias or a marker."""


class DeployError(ImgclfError):
    """Applying the InferenceService to the cluster failed, or it never became Ready."""


class Preempted(ImgclfError):
    """Training stopped on SIGTERM (a preempted node) after writing a checkpoint.

    Exit code 75 is EX_TEMPFAIL (sysexits.h): a temporary failure, so run the same command
    again, which resumes from the checkpoint. Retry policies can tell it from a real failure.
    """

    exit_code = 75
