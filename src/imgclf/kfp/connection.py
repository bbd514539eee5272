"""Where the KFP API is, how to authenticate, and its failures as one-line messages.

The API is found the way the kfp SDK and CLI find it, so a shell set up for ``kfp`` works
for ``imgclf pipeline`` too. First match wins:

====================================  ==============================================
host                                  namespace
====================================  ==============================================
``--host``                            ``--namespace``
``KFP_HOST``                          ``KFP_NAMESPACE``
``KF_PIPELINES_ENDPOINT`` (kfp SDK)   ``namespace`` of ``$HOME/.config/kfp/context.json``
in-cluster, inside a pod              none (single-user Kubeflow)
``http://localhost:8080``
====================================  ==============================================

The kfp context file (``kfp.Client._LOCAL_KFP_CONTEXT``; ``kfp.Client`` writes it in
``set_user_namespace``) holds a namespace and auth cookie/header settings but no endpoint
in kfp 2.x, so only its namespace is used; ``kfp.Client`` applies the rest itself.

The token is only ever put in the ``Authorization`` header; it never appears in messages or
reprs. ``kfp`` is imported inside functions so ``imgclf --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.errors import ConfigError
from imgclf.kfp.errors import KfpError

if TYPE_CHECKING:
    import kfp

DEFAULT_HOST = "http://localhost:8080"
IN_CLUSTER_API = "ml-pipeline.kubeflow.svc.cluster.local:8888"
HOST_VARS = ("KFP_HOST", "KF_PIPELINES_ENDPOINT")  # ours, then the kfp SDK's
KFP_CONTEXT_FILE = Path(".config", "kfp", "context.json")  # under HOME, as kfp.Client has it


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the KFP API is and how to authenticate; ``host=None`` means in-cluster."""

    host: str | None
    namespace: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The API address for messages (never includes the token)."""
        return self.host or f"{IN_CLUSTER_API} (in-cluster)"


def resolve_connection(
    host: str | None = None,
    namespace: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Connection:
    """Flags first, then the environment, then the kfp context file (module docstring).

    Without a host, a process inside a pod (``KUBERNETES_SERVICE_HOST`` set) lets
    ``kfp.Client`` find the in-cluster API and its service-account token; elsewhere the
    default is ``http://localhost:8080``, the address of
    ``kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80``. Everything comes from
    ``env`` (default ``os.environ``), the context file through its ``HOME``.
    """
    env = os.environ if env is None else env
    host = host or next((env[v].strip() for v in HOST_VARS if env.get(v, "").strip()), None)
    if host is None and not env.get("KUBERNETES_SERVICE_HOST"):
        host = DEFAULT_HOST
    namespace = namespace or env.get("KFP_NAMESPACE") or context_namespace(env)
    token = env.get("KFP_TOKEN") or None
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
        if not token:
            raise ConfigError(f"--token-file {path}: the file is empty")
    return Connection(host=host.rstrip("/") if host else None, namespace=namespace, token=token)


def context_namespace(env: Mapping[str, str] | None = None) -> str | None:
    """The namespace saved in the kfp context file under ``HOME``, None if there is none.

    A file that is there but unreadable is a ConfigError naming it: ``kfp.Client`` reads the
    same file and would fail later with a bare JSON traceback.
    """
    env = os.environ if env is None else env
    home = env.get("HOME")
    if not home:
        return None
    path = Path(home, KFP_CONTEXT_FILE)
    try:
        context = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise ConfigError(f"{path}: cannot read the kfp context ({reason})") from None
    namespace = context.get("namespace") if isinstance(context, dict) else None
    if namespace is not None and not isinstance(namespace, str):
        raise ConfigError(f"{path}: namespace must be a string, not {namespace!r}")
    return (namespace or "").strip() or None


def _error_message(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return " ".join(str(body or "").split())[:300]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or "").strip()
    return ""


def _connection_reason(exc: Exception) -> str:
    reason = str(getattr(exc, "reason", None) or exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", reason)
    return found.group(0).strip() if found else type(getattr(exc, "reason", exc)).__name__


@contextlib.contextmanager
def api_errors(conn: Connection, action: str) -> Iterator[None]:
    """Turn transport and HTTP failures of ``action`` into one-line :class:`KfpError`."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status == 0:
            raise KfpError(f"{action}: KFP API at {conn.where}: {exc.reason}") from None
        detail = _error_message(exc.body)
        hint = ""
        if exc.status in (401, 403):
            hint = " (check the token in KFP_TOKEN or --token-file, and --namespace)"
        raise KfpError(
            f"{action}: KFP API at {conn.where} answered {exc.status} {exc.reason}"
            + (f": {detail}" if detail else "")
            + hint
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise KfpError(
            f"{action}: cannot reach the KFP API at {conn.where} ({_connection_reason(exc)}); "
            "start `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` or set "
            "--host / KFP_HOST"
        ) from None


def _check_reachable(conn: Connection) -> None:
    """One health request with a timeout before building ``kfp.Client``.

    ``kfp.Client`` retries a failing health check five times, five seconds apart, logging a
    traceback each time; asking once first gives the user a one-line answer at once.
    """
    import kfp_server_api

    cfg = kfp_server_api.Configuration(host=conn.host)
    cfg.retries = 0  # a refused connection is reported at once, without retry warnings
    if conn.token:
        cfg.api_key["authorization"] = conn.token
        cfg.api_key_prefix["authorization"] = "Bearer"
    api = kfp_server_api.HealthzServiceApi(kfp_server_api.ApiClient(cfg))
    with api_errors(conn, "health check"):
        api.healthz_service_get_healthz(_request_timeout=15)


def connect(conn: Connection) -> kfp.Client:
    """A ``kfp.Client`` for ``conn``, after checking the API answers."""
    import kfp

    if conn.host:
        _check_reachable(conn)
    with warnings.catch_warnings(), api_errors(conn, "connect"):
        # "This client only works with KFP v2.0.0-beta.2 and later": true of every
        # server the v2beta1 API exists on, so it is noise here.
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=conn.host, existing_token=conn.token)
