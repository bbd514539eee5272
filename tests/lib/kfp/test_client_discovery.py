"""Where ``imgclf pipeline`` finds the KFP API: the kfp SDK's conventions as well as ours.

Resolution is tested as a pure function of an explicit environment (``HOME`` points at a
temp dir holding the kfp context file, so the user's own ``~/.config/kfp`` is never read);
one test goes through the CLI to the recording API double to show the resolved endpoint
and namespace are the ones the requests really use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgclf.cli import main
from imgclf.errors import ConfigError
from imgclf.kfp.connection import (
    DEFAULT_HOST,
    KFP_CONTEXT_FILE,
    context_namespace,
    resolve_connection,
)
from kfp_api_double import KfpApiDouble

FLAG = "http://flag.example:1"
OURS = "http://kfp-host.example:2"
SDK = "http://kf-pipelines.example:3"


def write_context(home: Path, context: object) -> Path:
    """The kfp context file under ``home``, as ``kfp.Client.set_user_namespace`` writes it."""
    path = home / KFP_CONTEXT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(context), encoding="utf-8")
    return path


def test_context_file_is_where_kfp_client_keeps_it() -> None:
    from kfp.client.client import Client

    assert Client._LOCAL_KFP_CONTEXT.endswith(str(Path("", KFP_CONTEXT_FILE)))


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (FLAG, {"KFP_HOST": OURS, "KF_PIPELINES_ENDPOINT": SDK}, FLAG),
        (None, {"KFP_HOST": OURS, "KF_PIPELINES_ENDPOINT": SDK}, OURS),
        (None, {"KF_PIPELINES_ENDPOINT": SDK + "/"}, SDK),
        (None, {"KF_PIPELINES_ENDPOINT": SDK, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, SDK),
        (None, {"KFP_HOST": "  ", "KF_PIPELINES_ENDPOINT": SDK}, SDK),
        (None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),
        (None, {}, DEFAULT_HOST),
    ],
    ids=["flag", "KFP_HOST", "KF_PIPELINES_ENDPOINT", "sdk-var-in-pod", "blank", "pod", "default"],
)
def test_host_precedence(flag: str | None, env: dict[str, str], expected: str | None) -> None:
    assert resolve_connection(flag, env=env).host == expected


def test_namespace_from_the_context_file_after_flag_and_env(tmp_path: Path) -> None:
    write_context(tmp_path, {"namespace": "team-ctx", "client_authentication_cookie": "c=1"})
    env = {"HOME": str(tmp_path)}
    conn = resolve_connection(env=env)
    assert conn.namespace == "team-ctx"
    assert conn.host == DEFAULT_HOST, "the context file holds no endpoint in kfp 2.x"
    assert resolve_connection(env={**env, "KFP_NAMESPACE": "team-env"}).namespace == "team-env"
    assert resolve_connection(namespace="team-flag", env=env).namespace == "team-flag"


@pytest.mark.parametrize("context", [{"namespace": ""}, {"namespace": " "}, {}, {"other": 1}])
def test_context_without_a_namespace_means_none(tmp_path: Path, context: object) -> None:
    write_context(tmp_path, context)
    assert context_namespace({"HOME": str(tmp_path)}) is None


def test_no_home_or_no_file_means_no_context(tmp_path: Path) -> None:
    assert context_namespace({}) is None
    assert context_namespace({"HOME": str(tmp_path)}) is None
    assert resolve_connection(env={"HOME": str(tmp_path)}).namespace is None


@pytest.mark.parametrize(
    ("text", "match"),
    [("{not json", "not valid JSON"), ('{"namespace": 7}', "namespace must be a string")],
)
def test_a_broken_context_file_is_named(tmp_path: Path, text: str, match: str) -> None:
    path = write_context(tmp_path, {})
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as err:
        resolve_connection(env={"HOME": str(tmp_path)})
    assert str(path) in str(err.value)


@pytest.fixture
def sdk_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[KfpApiDouble]:
    """A shell set up only the kfp SDK's way: KF_PIPELINES_ENDPOINT and a context file."""
    with KfpApiDouble(multi_user=True) as double:
        for name in ("KFP_HOST", "KFP_NAMESPACE", "KFP_TOKEN", "KUBERNETES_SERVICE_HOST"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", double.url)
        monkeypatch.setenv("HOME", str(tmp_path))
        write_context(tmp_path, {"namespace": "team-ctx"})
        yield double


def test_cli_reaches_the_sdk_endpoint_in_the_context_namespace(
    sdk_configured: KfpApiDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pipeline", "runs"]) == 0
    capsys.readouterr()
    assert sdk_configured.find("GET", "/apis/v2beta1/healthz")
    (listing,) = sdk_configured.find("GET", "/apis/v2beta1/runs")
    assert listing.param("namespace") == "team-ctx"
