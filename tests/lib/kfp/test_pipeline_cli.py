"""``imgclf pipeline ...`` against a recording KFP API double, and kfp.local for ``--local``.

The client side is real (``imgclf.cli.main`` -> ``kfp.Client`` 2.17 -> HTTP); only KFP's API
server is stood in for by :mod:`kfp_api_double`. Assertions read the requests the server
received: uploaded bytes, JSON bodies, paths and query strings.
"""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler, dsl
from kfp.pipeline_spec import pipeline_spec_pb2

from _repo_copy import REPO
from imgclf.cli import main
from imgclf.errors import ConfigError
from imgclf.kfp import RunFailed
from imgclf.kfp.client import DEFAULT_PIPELINE_NAME
from imgclf.kfp.connection import DEFAULT_HOST, resolve_connection
from imgclf.kfp.cron import validate_cron
from imgclf.kfp.local import run_local
from imgclf.kfp.package import DEFAULT_PACKAGE, load_package
from imgclf.kfp.params import parse_params, parse_timestamp, pipeline_parameters
from kfp_api_double import KfpApiDouble

PARAMS = REPO / "params.yaml"
TOKEN = "tok-3f9a-do-not-print"
BASE = "python:3.11-slim"


@dsl.component(base_image=BASE)
def _scale(x: int, factor: float, label: str, flag: bool) -> float:
    return x * factor if flag else float(len(label))


@dsl.pipeline(name="tiny-train")
def tiny_pipeline(
    epochs: int = 1, lr: float = 0.1, source: str = "sample:digits", flag: bool = False
) -> float:
    """A four-input pipeline standing in for the training DAG in client-side tests."""
    return _scale(x=epochs, factor=lr, label=source, flag=flag).output


@dsl.component(base_image=BASE)
def _write(text: str, times: int, out: dsl.Output[dsl.Dataset]) -> None:
    with open(out.path, "w") as fh:
        fh.write(text * times)


@dsl.component(base_image=BASE)
def _count(data: dsl.Input[dsl.Dataset], fail_above: int) -> int:
    with open(data.path) as fh:
        n = len(fh.read())
    if n > fail_above:
        raise ValueError(f"{n} characters is more than {fail_above}")
    return n


@dsl.pipeline(name="tiny-local")
def local_pipeline(text: str = "ab", times: int = 2, fail_above: int = 100) -> int:
    """Two tasks passing an artifact, to run through kfp.local's SubprocessRunner."""
    written = _write(text=text, times=times)
    return _count(data=written.outputs["out"], fail_above=fail_above).output


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "tiny.yaml"
    compiler.Compiler().compile(tiny_pipeline, str(path))
    return path


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Any:
    with KfpApiDouble(token=TOKEN) as double:
        monkeypatch.setenv("KFP_HOST", double.url)
        monkeypatch.setenv("KFP_TOKEN", TOKEN)
        monkeypatch.delenv("KFP_NAMESPACE", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield double


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["pipeline", *args])
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err
    return code, out, err


def body_of(api: KfpApiDouble, method: str, path: str) -> Any:
    (req,) = api.find(method, path)
    return req.json


# --------------------------------------------------------------------------------------
# validate_cron and other pure functions


@pytest.mark.parametrize(
    ("expr", "normalised"),
    [
        ("0 0 2 * * *", "0 0 2 * * *"),
        ("  0  0   2 * *  * ", "0 0 2 * * *"),
        ("*/15 0 9-17 ? * MON-FRI", "*/15 0 9-17 ? * MON-FRI"),
        ("0 30 2 1,15 jan-jun ?", "0 30 2 1,15 jan-jun ?"),
        ("59 59 23 31 12 6", "59 59 23 31 12 6"),
        ("0 5/10 * * * SUN,SAT", "0 5/10 * * * SUN,SAT"),
        ("0 0 0-23/2 * * *", "0 0 0-23/2 * * *"),
        ("@daily", "@daily"),
        ("@every 1h", "@every 1h"),
    ],
)
def test_validate_cron_accepts(expr: str, normalised: str) -> None:
    assert validate_cron(expr) == normalised


def test_validate_cron_five_fields_shows_six_field_form() -> None:
    with pytest.raises(ConfigError) as err:
        validate_cron("0 2 * * *")
    assert str(err.value) == (
        '--cron "0 2 * * *" has 5 fields; KFP expects 6 (seconds first): "0 0 2 * * *"'
    )


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("0 0 2 * * * 2025", "has 7 fields"),
        ("", "has 0 fields"),
        ("60 0 2 * * *", "seconds value 60 is outside 0-59"),
        ("0 60 2 * * *", "minutes value 60 is outside 0-59"),
        ("0 0 24 * * *", "hours value 24 is outside 0-23"),
        ("0 0 2 0 * *", "day-of-month value 0 is outside 1-31"),
        ("0 0 2 32 * *", "day-of-month value 32 is outside 1-31"),
        ("0 0 2 * 13 *", "month value 13 is outside 1-12"),
        ("0 0 2 * FOO *", "month value 'FOO' is not a number (1-12 or JAN-DEC)"),
        ("0 0 2 * * 7", "day-of-week value 7 is outside 0-6"),
        ("0 0 2 * * MONDAY", "day-of-week value 'MONDAY' is not a number"),
        ("0 0 ? * * *", '"?" is only allowed in day-of-month and day-of-week'),
        ("0 0 5-2 * * *", "range '5-2' runs backwards"),
        ("0 */0 * * * *", "step '0' in '*/0' must be a positive integer"),
        ("0 1,,2 * * * *", "empty item in minutes"),
        ("0 0 2 L * *", "day-of-month value 'L' is not a number"),
        ("0 0 2- * * *", "hours item '2-' is not valid cron syntax"),
        ("@every 1d", "is not a positive Go duration"),
    ],
)
def test_validate_cron_rejects(expr: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="--cron") as err:
        validate_cron(expr)
    assert fragment in str(err.value)


def test_parse_params_types_values_from_the_pipeline_spec(package: Path) -> None:
    spec = load_package(package)
    params = parse_params(["epochs=3", "lr=5e-4", "source=2024", "flag=true"], spec)
    assert params == {"epochs": 3, "lr": 0.0005, "source": "2024", "flag": True}
    assert type(params["epochs"]) is int and type(params["lr"]) is float
    with pytest.raises(ConfigError, match=r"no such input \(inputs: epochs, flag, lr, source\)"):
        parse_params(["epoch=3"], spec)
    with pytest.raises(ConfigError, match="epochs is NUMBER_INTEGER, expected an integer"):
        parse_params(["epochs=three"], spec)
    with pytest.raises(ConfigError, match="expected true or false"):
        parse_params(["flag=maybe"], spec)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_params(["epochs"], spec)
    assert parse_params(["a=1", "b=x", "c=[1, 2]"]) == {"a": 1, "b": "x", "c": [1, 2]}


def test_load_package_rejects_what_is_not_a_pipeline(tmp_path: Path) -> None:
    not_spec = tmp_path / "values.yaml"
    not_spec.write_text("a: 1\n")
    with pytest.raises(ConfigError, match=r"values.yaml: not a compiled KFP pipeline"):
        load_package(not_spec)
    with pytest.raises(ConfigError, match="no such file"):
        load_package(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"expected a compiled pipeline \.yaml"):
        load_package(tmp_path / "pipeline.json")


def test_resolve_connection_precedence_and_secrecy(tmp_path: Path) -> None:
    env = {"KFP_HOST": "http://kfp.example:8888/", "KFP_NAMESPACE": "team-a", "KFP_TOKEN": "t1"}
    conn = resolve_connection(env=env)
    assert (conn.host, conn.namespace, conn.token) == ("http://kfp.example:8888", "team-a", "t1")
    assert "t1" not in repr(conn)
    assert resolve_connection("http://other:1", "ns", env=env).host == "http://other:1"
    assert resolve_connection(env={}).host == DEFAULT_HOST
    in_pod = resolve_connection(env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert in_pod.host is None and "in-cluster" in in_pod.where
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert resolve_connection(token_file=token_file, env=env).token == "from-file"
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="token: the file is empty"):
        resolve_connection(token_file=token_file, env=env)
    with pytest.raises(ConfigError, match="cannot read it"):
        resolve_connection(token_file=tmp_path / "nope", env=env)


def test_parse_timestamp_is_rfc3339_utc() -> None:
    assert parse_timestamp("2025-01-31", "--start") == "2025-01-31T00:00:00Z"
    assert parse_timestamp("2025-01-31T03:00:00+01:00", "--end") == "2025-01-31T02:00:00Z"
    with pytest.raises(ConfigError, match="--start 'tomorrow'"):
        parse_timestamp("tomorrow", "--start")


# --------------------------------------------------------------------------------------
# upload


def test_upload_creates_pipeline_then_new_versions(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "upload", "--package", str(package))
    assert code == 0
    (upload,) = api.find("POST", "/pipelines/upload")
    assert upload.param("name") == "imgclf-training"
    sent = upload.files["uploadfile"]
    assert sent.data == package.read_bytes()
    spec = yaml.safe_load(sent.data)
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    assert spec["pipelineInfo"]["name"] == "tiny-train"
    (pipeline_id,) = api.pipelines
    (version_id,) = api.versions
    assert f"pipeline id: {pipeline_id}" in out and f"version id:  {version_id}" in out

    code, out, _ = cli(capsys, "upload", "--package", str(package), "--version", "v2")
    assert code == 0
    (new_version,) = api.find("POST", "/pipelines/upload_version")
    assert new_version.param("pipelineid") == pipeline_id
    assert new_version.param("name") == "v2"
    assert new_version.files["uploadfile"].data == package.read_bytes()
    assert len(api.find("POST", "/pipelines/upload")) == 1
    assert "new version of 'imgclf-training'" in out

    code, _, _ = cli(capsys, "upload", "--package", str(package))
    assert code == 0
    names = [r.param("name") for r in api.find("POST", "/pipelines/upload_version")]
    assert names[1].startswith("imgclf-training-") and names[1] != "v2"

    assert api.requests and all(r.authorized for r in api.requests)
    assert all(r.headers["Authorization"] == "Bearer <redacted>" for r in api.requests)


# --------------------------------------------------------------------------------------
# run


def test_run_from_package_sends_typed_parameters(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(
        capsys,
        "run",
        "--package",
        str(package),
        "--param",
        "epochs=3",
        "--param",
        "lr=0.25",
        "--param",
        "source=2024",
        "--param",
        "flag=true",
        "--run-name",
        "nightly-1",
        "--pipeline-root",
        "s3://bucket/kfp",
    )
    assert code == 0
    experiment = body_of(api, "POST", "/experiments")
    assert experiment["display_name"] == "imgclf"
    run = body_of(api, "POST", "/runs")
    params = run["runtime_config"]["parameters"]
    assert params == {"epochs": 3, "lr": 0.25, "source": "2024", "flag": True}
    assert [type(params[k]) for k in ("epochs", "lr", "source", "flag")] == [int, float, str, bool]
    assert run["runtime_config"]["pipeline_root"] == "s3://bucket/kfp"
    assert run["display_name"] == "nightly-1"
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-train"
    assert run["pipeline_spec"] == yaml.safe_load(package.read_text())
    assert "pipeline_version_reference" not in run
    (experiment_id,) = api.experiments
    assert run["experiment_id"] == experiment_id
    (run_id,) = api.runs
    assert f"started run 'nightly-1': {run_id}" in out

    code, _, _ = cli(capsys, "run", "--package", str(package))
    assert code == 0
    assert len(api.find("POST", "/experiments")) == 1, "the experiment is reused by name"
    assert len(api.find("POST", "/runs")) == 2


def test_run_uploaded_pipeline_uses_latest_version_and_its_types(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "upload", "--package", str(package))[0] == 0
    assert cli(capsys, "upload", "--package", str(package), "--version", "v2")[0] == 0
    (pipeline_id,) = api.pipelines
    v2 = next(v for v in api.versions.values() if v["display_name"] == "v2")
    code, _, _ = cli(capsys, "run", "--pipeline-id", pipeline_id, "--param", "epochs=7")
    assert code == 0
    run = body_of(api, "POST", "/runs")
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": v2["pipeline_version_id"],
    }
    assert "pipeline_spec" not in run
    assert run["runtime_config"]["parameters"] == {"epochs": 7}

    code, _, err = cli(capsys, "run", "--pipeline-id", pipeline_id, "--param", "epochs=x")
    assert code == 2 and "epochs is NUMBER_INTEGER" in err
    assert len(api.find("POST", "/runs")) == 1


def test_run_wait_succeeds_with_progress(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.run_script = ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    code, out, err = cli(
        capsys, "run", "--package", str(package), "--wait", "--poll-interval", "0.01"
    )
    assert code == 0
    (run_id,) = api.runs
    assert len(api.find("GET", f"/runs/{run_id}")) == 4
    progress = [line for line in err.splitlines() if line.startswith(f"run {run_id}")]
    assert [line.split()[2] for line in progress] == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert f"run {run_id} SUCCEEDED" in out


@pytest.mark.parametrize("final", ["FAILED", "CANCELED"])
def test_run_wait_fails_when_the_run_does(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str], final: str
) -> None:
    api.run_script = ["RUNNING", final]
    code, _, err = cli(capsys, "run", "--package", str(package), "--wait", "--poll-interval", "0")
    assert code == RunFailed.exit_code != 0
    (run_id,) = api.runs
    (last,) = err.strip().splitlines()[-1:]
    assert last.startswith("imgclf pipeline: error: run ") and f"({run_id}) ended {final}" in last
    if final == "FAILED":
        assert api.failure_message in last


def test_run_wait_times_out(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.run_script = ["RUNNING"]
    code, _, err = cli(
        capsys,
        "run",
        "--package",
        str(package),
        "--wait",
        "--timeout",
        "0.2",
        "--poll-interval",
        "0.05",
    )
    assert code == 1
    assert "is still RUNNING after 0.2s; it keeps running" in err


def test_run_rejects_unknown_parameter_before_any_request(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "run", "--package", str(package), "--param", "epoch=2")
    assert code == 2
    assert "--param epoch: the pipeline has no such input" in err
    assert api.requests == []


# --------------------------------------------------------------------------------------
# schedules


def test_schedule_create_sends_cron_concurrency_and_no_catchup(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(
        capsys,
        "schedule",
        "create",
        "--cron",
        "0 0 2 * * *",
        "--package",
        str(package),
        "--param",
        "epochs=5",
        "--start",
        "2025-01-01T00:00:00",
        "--end",
        "2026-01-01T00:00:00Z",
        "--experiment",
        "nightly",
    )
    assert code == 0
    body = body_of(api, "POST", "/recurringruns")
    cron = body["trigger"]["cron_schedule"]
    assert cron == {
        "cron": "0 0 2 * * *",
        "start_time": "2025-01-01T00:00:00Z",
        "end_time": "2026-01-01T00:00:00Z",
    }
    assert body["max_concurrency"] == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["pipeline_spec"] == yaml.safe_load(package.read_text())
    assert body["runtime_config"]["parameters"] == {"epochs": 5}
    assert body["display_name"] == "imgclf-training-nightly"
    assert body_of(api, "POST", "/experiments")["display_name"] == "nightly"
    (rr,) = api.recurring_runs.values()
    assert rr["max_concurrency"] == "1"
    assert f"created recurring run 'imgclf-training-nightly': {rr['recurring_run_id']}" in out


def test_schedule_without_action_is_create(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = cli(capsys, "schedule", "--cron", "0 0 2 * * *", "--package", str(package))
    assert code == 0
    body = body_of(api, "POST", "/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True


def test_schedule_without_cron_or_action_sends_nothing(
    api: KfpApiDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "schedule")
    assert code == 2 and "needs --cron" in err
    assert api.requests == []


def test_schedule_create_from_uploaded_version(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "upload", "--package", str(package))[0] == 0
    (pipeline_id,) = api.pipelines
    (version_id,) = api.versions
    args = ["--pipeline-id", pipeline_id, "--version-id", version_id, "--name", "weekly"]
    code, _, _ = cli(capsys, "schedule", "create", "--cron", "0 30 3 ? * SUN", *args)
    assert code == 0
    body = body_of(api, "POST", "/recurringruns")
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
    }
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 3 ? * SUN"
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True


def test_five_field_cron_is_rejected_before_any_request(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(
        capsys, "schedule", "create", "--cron", "0 2 * * *", "--package", str(package)
    )
    assert code == 2
    assert api.requests == []
    assert err.strip() == (
        'imgclf pipeline: error: --cron "0 2 * * *" has 5 fields; '
        'KFP expects 6 (seconds first): "0 0 2 * * *"'
    )
    assert out == ""


def test_schedule_enable_disable_delete_and_list(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cron = ["--cron", "0 0 2 * * *", "--package", str(package)]
    assert cli(capsys, "schedule", "create", *cron)[0] == 0
    (rr_id,) = api.recurring_runs

    assert cli(capsys, "schedule", "disable", rr_id)[0] == 0
    assert [r.path for r in api.requests if r.method == "POST"][-1] == (
        f"/apis/v2beta1/recurringruns/{rr_id}:disable"
    )
    code, out, _ = cli(capsys, "schedule", "list")
    assert code == 0
    (row,) = [line for line in out.splitlines() if line.startswith(rr_id)]
    assert row.split()[2:5] == ["DISABLED", "0", "0"]

    assert cli(capsys, "schedule", "enable", rr_id)[0] == 0
    assert api.find("POST", f"/recurringruns/{rr_id}:enable")
    code, out, _ = cli(capsys, "schedule", "list", "--experiment", "imgclf")
    assert "ENABLED" in out
    (listing,) = api.find("GET", "/recurringruns")[-1:]
    assert listing.param("experiment_id") == next(iter(api.experiments))

    assert cli(capsys, "schedule", "delete", rr_id)[0] == 0
    assert api.find("DELETE", f"/recurringruns/{rr_id}")
    assert api.recurring_runs == {}
    assert cli(capsys, "schedule", "list")[1].strip() == "no recurring runs"

    code, _, err = cli(capsys, "schedule", "delete", rr_id)
    assert code == 1
    assert err.count("\n") == 1 and "answered 404" in err and rr_id in err


# --------------------------------------------------------------------------------------
# runs listing, connection, auth


def test_runs_lists_recent_runs_with_state(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.run_script = ["FAILED"]
    assert cli(capsys, "run", "--package", str(package), "--run-name", "first")[0] == 0
    first = next(iter(api.runs))
    cli(capsys, "run", "--package", str(package), "--run-name", "second", "--wait")
    code, out, _ = cli(capsys, "runs", "--limit", "5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "CREATED", "FINISHED"]
    assert lines[1].split()[1:3] == ["second", "FAILED"], "newest first"
    assert lines[2].split()[:3] == [first, "first", "PENDING"]
    (listing,) = api.find("GET", "/runs")
    assert listing.param("page_size") == "5"
    assert listing.param("sort_by") == "created_at desc"

    assert cli(capsys, "runs", "--experiment", "imgclf")[0] == 0
    assert api.find("GET", "/runs")[-1].param("experiment_id") == next(iter(api.experiments))
    code, _, err = cli(capsys, "runs", "--experiment", "missing")
    assert code == 1 and "No experiment is found with name missing" in err


def test_unreachable_host_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    with KfpApiDouble() as closed:
        host = closed.url  # a port that is free again once the double stops
    code, _, err = cli(capsys, "runs", "--host", host)
    assert code == 1
    (line,) = err.strip().splitlines()
    prefix = "imgclf pipeline: error: health check: cannot reach the KFP API at "
    assert line.startswith(prefix + host)
    assert "Connection refused" in line


def test_wrong_token_is_reported_without_printing_it(
    api: KfpApiDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token-77\n")
    code, out, err = cli(capsys, "runs", "--token-file", str(token_file))
    assert code == 1
    assert "answered 401" in err and "KFP_TOKEN or --token-file" in err
    assert "wrong-token-77" not in out + err
    assert [r.authorized for r in api.requests] == [False]

    token_file.write_text(TOKEN)
    assert cli(capsys, "runs", "--token-file", str(token_file))[0] == 0


def test_namespace_scopes_experiments_and_uploads(
    api: KfpApiDouble, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = ["--namespace", "team-a"]
    assert cli(capsys, "upload", "--package", str(package), *ns)[0] == 0
    assert api.find("POST", "/pipelines/upload")[0].param("namespace") == "team-a"
    assert cli(capsys, "run", "--package", str(package), *ns)[0] == 0
    assert body_of(api, "POST", "/experiments")["namespace"] == "team-a"
    assert api.find("GET", "/experiments")[0].param("namespace") == "team-a"


# --------------------------------------------------------------------------------------
# the real training pipeline: compile, then what run/upload send


def test_compile_and_run_the_training_pipeline(
    api: KfpApiDouble,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out_path = tmp_path / "compiled.yaml"
    code, out, _ = cli(capsys, "compile", "--out", str(out_path))
    assert code == 0 and f"compiled {out_path}" in out
    spec = load_package(out_path)
    assert spec["pipelineInfo"]["name"] == DEFAULT_PIPELINE_NAME
    assert {"epochs", "lr", "source"} <= set(pipeline_parameters(spec))

    monkeypatch.chdir(tmp_path)  # run without --package compiles to ./pipelines/...
    pairs = ["--param", "epochs=2", "--param", "lr=0.01", "--param", "source=2024"]
    code, out, _ = cli(capsys, "run", "--params", str(PARAMS), *pairs)
    assert code == 0 and f"compiled {DEFAULT_PACKAGE}" in out
    run = body_of(api, "POST", "/runs")
    # lr is a string run parameter ("auto" or a rate), typed from the compiled pipeline
    assert run["runtime_config"]["parameters"] == {"epochs": 2, "lr": "0.01", "source": "2024"}
    # The cluster wiring (secrets, GPU node selector) travels as the platform spec beside it.
    assert run["pipeline_spec"]["pipeline_spec"]["root"] == spec["root"]
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]

    code, _, _ = cli(capsys, "upload", "--package", str(out_path))
    assert code == 0
    uploaded = api.find("POST", "/pipelines/upload")[0].files["uploadfile"].data
    assert uploaded == out_path.read_bytes()


def test_compile_builds_the_pipeline_from_the_given_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    out_path = tmp_path / "custom.yaml"
    assert cli(capsys, "compile", "--out", str(out_path), "--params", str(params))[0] == 0
    inputs = load_package(out_path)["root"]["inputDefinitions"]["parameters"]
    assert inputs["epochs"]["defaultValue"] == 3
    assert cli(capsys, "compile", "--out", str(out_path))[0] == 0
    inputs = load_package(out_path)["root"]["inputDefinitions"]["parameters"]
    assert inputs["epochs"]["defaultValue"] != 3, "without --params: ./params.yaml"


def test_missing_pipeline_entry_point_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("imgclf.cli.pipeline.entry_points", lambda **_select: ())
    code, _, err = cli(capsys, "compile", "--out", str(tmp_path / "never.yaml"))
    assert code == ConfigError.exit_code
    (line,) = err.strip().splitlines()
    assert "imgclf.pipelines entry points; reinstall with `pip install -e .`" in line
    assert not (tmp_path / "never.yaml").exists()


# --------------------------------------------------------------------------------------
# --local: the same DAG through kfp.local's SubprocessRunner


def test_run_local_executes_the_dag(tmp_path: Path) -> None:
    root = tmp_path / "kfp_root"
    result = run_local(local_pipeline, ["times=3", "text=xyz"], pipeline_root=root)
    assert result["outputs"] == {"Output": 9}
    assert result["parameters"] == {"times": 3, "text": "xyz"}
    (written,) = root.glob("tiny-local-*/write/out")
    assert written.read_text() == "xyz" * 3

    with pytest.raises(RunFailed, match="local run of tiny-local failed"):
        run_local(local_pipeline, ["fail_above=1"], pipeline_root=root)


def test_local_flag_refuses_remote_only_flags(
    package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "run", "--local", "--package", str(package))
    assert code == 2 and "--local runs the pipeline function in this process" in err
