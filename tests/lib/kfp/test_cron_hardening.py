"""Recurring-run schedules that KFP would accept and then never run (or run otherwise).

KFP's API server and ScheduledWorkflow controller read schedules with robfig/cron v1's
``cron.Parse``: six fields, or a descriptor (``@daily``..., ``@every <Go duration>``). A date
that does not exist parses fine and never fires, and ``@every`` intervals are rounded to whole
seconds; both are refused with the expression named, before anything reaches the server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from _repo_copy import REPO
from imgclf.cli import main
from imgclf.errors import ConfigError
from imgclf.kfp.cron import validate_cron
from imgclf.kfp.package import DEFAULT_PACKAGE
from kfp_api_double import KfpApiDouble

TOKEN = "tok-cron-hardening"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[KfpApiDouble]:
    with KfpApiDouble(token=TOKEN) as double:
        monkeypatch.setenv("KFP_HOST", double.url)
        monkeypatch.setenv("KFP_TOKEN", TOKEN)
        monkeypatch.delenv("KFP_NAMESPACE", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield double


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("0 0 2 31 2 *", "never fires: no month in '2' has a day-of-month in '31'"),
        ("0 0 0 30 2 ?", "never fires: no month in '2' has a day-of-month in '30'"),
        ("0 0 0 31 4,6,9,11 *", "never fires: no month in '4,6,9,11'"),
        ("0 0 0 30-31 FEB *", "never fires"),
        ("@reboot", "KFP's scheduler does not take @reboot"),
        ("@weekdays", "does not take @weekdays"),
        ("@daily 5", "@daily takes nothing after it"),
        ("@every", "@every takes one Go duration"),
        ("@every 1d", "'1d' is not a positive Go duration"),
        ("@every -1h", "'-1h' is not a positive Go duration"),
        ("@every 500ms", "the interval 500ms must be a whole number of seconds"),
        ("@every 1.5s", "the interval 1.5s must be a whole number of seconds"),
        ("@every 0s", "at least 1s"),
    ],
)
def test_schedules_that_never_fire_or_would_be_rounded_are_refused(
    expr: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        validate_cron(expr)
    message = str(err.value)
    assert message.startswith(f'--cron "{expr}"') and fragment in message


@pytest.mark.parametrize(
    ("expr", "normalised"),
    [
        ("0 0 0 29 2 *", "0 0 0 29 2 *"),  # leap years: robfig's search reaches one
        ("0 0 0 31 2 MON", "0 0 0 31 2 MON"),  # day of month OR day of week: every Monday
        ("0 0 0 30,31 1-2 ?", "0 0 0 30,31 1-2 ?"),  # January has them
        ("0 0 0 31 2 */2", "0 0 0 31 2 */2"),  # robfig versions differ: never refused
        ("@hourly", "@hourly"),
        ("@Midnight", "@midnight"),
        ("@every 1h", "@every 1h"),
        ("@EVERY   1h30m", "@every 1h30m"),
        ("@every 90s", "@every 90s"),
        ("@every 2000ms", "@every 2000ms"),
    ],
)
def test_schedules_the_kfp_scheduler_runs_are_accepted(expr: str, normalised: str) -> None:
    assert validate_cron(expr) == normalised


def test_the_cli_refuses_february_31st_before_contacting_the_server(
    api: KfpApiDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["pipeline", "schedule", "create", "--cron", "0 0 2 31 2 *"])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert err.strip().splitlines() == [
        "imgclf pipeline: error: --cron \"0 0 2 31 2 *\" never fires: no month in '2' has a "
        "day-of-month in '31'"
    ]
    assert api.requests == []


def test_the_cli_sends_an_every_schedule_as_kfp_reads_it(
    api: KfpApiDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    package = REPO / DEFAULT_PACKAGE
    code = main(["pipeline", "schedule", "--cron", "@every  6h", "--package", str(package)])
    assert code == 0, capsys.readouterr().err
    (request,) = api.find("POST", "/recurringruns")
    assert request.json["trigger"]["cron_schedule"]["cron"] == "@every 6h"
