"""The minio client the S3 store runs on, and how its failures read and are retried.

Kept apart from :mod:`imgclf.storage.s3` (what the store does) because tests, the dev server
and benchmarks build clients too, and the error wording is its own concern: one line a user
can act on, never the secret.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from imgclf.storage.s3config import S3Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = (500, 502, 503, 504)
BACKOFF_BASE = 0.2
BACKOFF_MAX = 5.0
DENIED = {
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
}
NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


def make_http_client(settings: S3Settings) -> urllib3.PoolManager:
    """The urllib3 pool the SDK uses: timeouts, and retries of 5xx with backoff and jitter.

    Connection and read errors are *not* retried here (connect=0, read=0) but by
    :func:`call_with_retries`, which bounds the total time; retrying them at both levels would
    multiply the wait on an unreachable endpoint.
    """
    retry = urllib3.Retry(
        total=settings.retries,
        connect=0,
        read=0,
        other=0,
        status=settings.retries,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,  # S3 PUT/DELETE/multipart calls are safe to repeat
        backoff_factor=BACKOFF_BASE,
        backoff_max=BACKOFF_MAX,
        backoff_jitter=BACKOFF_BASE,
        raise_on_status=False,  # let the SDK turn the last 5xx into an S3Error with details
    )
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.timeout, read=settings.timeout),
        maxsize=settings.workers + 2,
        retries=retry,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )


def make_client(settings: S3Settings, http_client: urllib3.PoolManager | None = None) -> Minio:
    """A minio client for ``settings`` with the store's timeouts and retry policy.

    Static keys (environment, credential files) win; otherwise the renewing provider chain
    (an IAM role), which the SDK asks before each request and refreshes when it expires;
    with neither, anonymous requests.
    """
    return Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        session_token=settings.session_token,
        secure=settings.secure,
        region=settings.region,
        http_client=http_client if http_client is not None else make_http_client(settings),
        credentials=None if settings.access_key else settings.credentials,
    )


def describe_failure(exc: BaseException, bucket: str, timeout: float) -> str:
    """What went wrong, in words a user can act on (no endpoint, key or secret in it)."""
    if isinstance(exc, S3Error):
        if exc.code in DENIED:
            return (
                f"access denied ({exc.code}); check the credentials for this endpoint "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials)"
            )
        if exc.code == "NoSuchBucket":
            return f"bucket {bucket!r} does not exist"
        if exc.code in NOT_FOUND:
            return "not found"
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, ServerError):
        return f"server error (HTTP {exc.status_code})"
    if isinstance(exc, InvalidResponseError):
        return f"unexpected response: {str(exc)[:200]}"
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, NameResolutionError):
        return "cannot resolve the host name; check MINIO_ENDPOINT / AWS_ENDPOINT_URL"
    if isinstance(exc, NewConnectionError):
        # "<conn object>: Failed to establish a new connection: [Errno 111] Connection refused"
        return f"cannot connect ({str(exc).rsplit(': ', 1)[-1]})"
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
        return f"no answer within {timeout:g}s (IMGCLF_S3_TIMEOUT)"
    if isinstance(exc, SSLError):
        return "TLS failed; if the endpoint speaks plain HTTP use http:// or MINIO_SECURE=false"
    if isinstance(exc, ProtocolError | ConnectionError):
        return f"connection lost ({exc})"
    return f"{type(exc).__name__}: {exc}"


def is_retryable(exc: BaseException) -> bool:
    """Fast connection failures are worth retrying; timeouts already took the full budget."""
    if isinstance(exc, MaxRetryError):
        exc = exc.reason if exc.reason is not None else exc
    if isinstance(exc, NameResolutionError | SSLError):
        return False
    if isinstance(exc, NewConnectionError):
        return True  # subclasses ConnectTimeoutError, so test it first
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
        return False
    return isinstance(exc, ProtocolError | ConnectionError)


def content_type(name: str) -> str:
    """A content type from the extension, so HTML reports open in a browser from S3."""
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def call_with_retries(
    fn: Callable[[], T],
    settings: S3Settings,
    fail: Callable[[BaseException, int], Exception],
    what: Callable[[BaseException], str],
) -> T:
    """``fn()``, retrying dropped/refused connections with backoff + jitter.

    Retries stop after ``settings.retries`` or once the time since the first failure plus
    the next wait would pass ``settings.timeout``, so an endpoint that is down fails within
    the timeout however many retries are allowed. ``fail(exc, attempts)`` builds the error
    raised; ``what(exc)`` describes a failure for the debug log of a retry.
    """
    attempt = 0
    first_failure: float | None = None
    while True:
        try:
            return fn()
        except (S3Error, ServerError, InvalidResponseError) as exc:
            raise fail(exc, 1) from exc
        except (HTTPError, OSError) as exc:
            if not is_retryable(exc):
                raise fail(exc, attempt + 1) from exc
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt) * random.uniform(0.5, 1.0)
            if attempt >= settings.retries or now - first_failure + delay > settings.timeout:
                raise fail(exc, attempt + 1) from exc
            # debug, not warning: the CLI's contract is one error line on stderr, and the
            # final error already says how many attempts were made
            log.debug("%s; retry %d in %.2fs", what(exc), attempt + 1, delay)
            time.sleep(delay)
            attempt += 1
