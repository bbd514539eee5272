"""The SeaweedFS launcher and ``imgclf dev s3``, each test with its own real server process."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from imgclf.dev import SeaweedServer, free_ports, running_s3_server
from imgclf.errors import ConfigError, StorageError
from imgclf.storage.s3 import S3Store
from imgclf.storage.s3config import ACCESS_KEY_VARS, ENDPOINT_VARS, SECRET_KEY_VARS, S3Settings

pytestmark = pytest.mark.s3

SECRET = "dev-secret-from-env-0123456789abcdefghij"
HANG_GUARD_S = 300


def alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (our children are reaped, so no zombies)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(address)
    return found


def test_lifecycle_loopback_only_and_clean_stop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_s3_server(data) as info:
        assert info.endpoint == f"http://127.0.0.1:{info.ports['s3']}"
        assert len(set(info.ports.values())) == len(info.ports) == 8
        assert 0 < info.startup_seconds < 60
        assert alive(info.pid)
        for name, port in info.ports.items():
            assert listeners(port) == {"0100007F"}, f"{name} port {port} not loopback-only"
        credentials = data / "s3-identities.json"
        assert credentials.stat().st_mode & 0o777 == 0o600
        assert info.secret_key not in repr(info)

        store = S3Store("lifecycle", "", info.settings(create_bucket=True))
        store.write_bytes("k.txt", b"v")
        assert store.read_bytes("k.txt") == b"v"
    assert not alive(info.pid)
    assert not credentials.exists()
    for port in info.ports.values():
        assert not list(Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"))
        assert listeners(port) == set()


def test_restart_and_crash_keep_endpoint_credentials_and_data(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "data")
    with server as first:
        settings = first.settings(timeout=2.0, create_bucket=True)
        S3Store("keep", "", settings).write_bytes("model.bin", b"weights")

        second = server.restart()
        assert (second.endpoint, second.access_key) == (first.endpoint, first.access_key)
        assert second.pid != first.pid and not alive(first.pid)
        assert S3Store("keep", "", settings).read_bytes("model.bin") == b"weights"

        server.kill()
        assert not server.running and not alive(second.pid)
        with pytest.raises(StorageError, match="cannot connect"):
            S3Store("keep", "", settings).read_bytes("model.bin")
        with server.stopped():
            assert not server.running
        assert server.running
        assert S3Store("keep", "", settings).read_bytes("model.bin") == b"weights"
    assert server.pid is None


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is already in use"):
            SeaweedServer(tmp_path / "data", port).start()


def _no_process_over(data_dir: Path) -> None:
    """Fail if any process still has ``data_dir`` on its command line."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert str(data_dir) not in cmdline.read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue


def test_startup_timeout_names_the_log_and_leaves_no_process(tmp_path: Path) -> None:
    # Only what start() guarantees: weed may or may not have logged anything in 0.2 s.
    server = SeaweedServer(tmp_path / "data", startup_timeout=0.2)
    with pytest.raises(StorageError, match=r"did not answer within 0.2s") as err:
        server.start()
    head, _, tail = str(err.value).partition(f"; last lines of {server.log_path}:\n")
    assert head and tail.strip()  # at least the command line start() logs before weed runs
    assert server.pid is None
    _no_process_over(tmp_path / "data")


def test_weed_exiting_at_start_shows_its_log_lines(tmp_path: Path) -> None:
    # Another program takes the master port while the server is down; the restart on the
    # same ports makes weed log a fatal bind error and exit, whatever the machine's speed.
    server = SeaweedServer(tmp_path / "data")
    with server as info:
        master_port = info.ports["master"]
    with (
        socket.create_server(("127.0.0.1", master_port)),
        pytest.raises(StorageError, match=r"weed\) exited with code \d+ while starting") as err,
    ):
        server.start()
    message = str(err.value)
    assert f"last lines of {server.log_path}:" in message
    assert re.search(r"^F\d{4} .*address already in use", message, re.M), message
    assert server.pid is None
    _no_process_over(tmp_path / "data")


def test_missing_weed_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMGCLF_WEED", str(tmp_path / "no-weed"))
    with pytest.raises(ConfigError, match=r"IMGCLF_WEED.*not an executable"):
        SeaweedServer(tmp_path / "data").start()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*ENDPOINT_VARS, *ACCESS_KEY_VARS, *SECRET_KEY_VARS)
    }
    env.update(extra)
    return env


def _start_cli(
    tmp_path: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], str, int, queue.Queue[str | None]]:
    """Run ``imgclf dev s3`` until it says it is ready: (process, output, port, later lines).

    The command starts with SIGINT ignored, as a background job of a script would: Ctrl-C
    must stop it all the same.
    """
    (port,) = free_ports(1)
    data_dir = str(tmp_path / "s3data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclf", "dev", "s3", "--port", str(port), "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process closed stdout

    threading.Thread(target=read, daemon=True).start()
    output = ""
    deadline = time.monotonic() + HANG_GUARD_S
    while "Press Ctrl-C" not in output:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            pytest.fail(f"imgclf dev s3 did not get ready:\n{output}")
        output += line
    return proc, output, port, lines


def _stop(proc: subprocess.Popen[str], sig: int, lines: queue.Queue[str | None]) -> tuple[int, str]:
    """Send ``sig``; the exit code and everything the command printed after being ready.

    The wait is a hang guard, not a speed requirement: a busy machine may take a while.
    """
    proc.send_signal(sig)
    try:
        code = proc.wait(HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    rest = ""
    while (line := lines.get(timeout=HANG_GUARD_S)) is not None:
        rest += line
    assert code is not None
    return code, rest


def _exports(output: str) -> dict[str, str]:
    return dict(re.findall(r"export (\w+)=(\S+)", output))


def test_cli_prints_working_exports_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, output, port, lines = _start_cli(tmp_path, _clean_env())
    weed_pid = int(re.search(r"\(pid (\d+)", output).group(1))  # type: ignore[union-attr]
    try:
        exports = _exports(output)
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert exports["AWS_SECRET_ACCESS_KEY"] in output  # generated keys are shown once
        assert re.search(r"ready in \d+\.\ds", output)
        store = S3Store("cli", "", S3Settings.from_env({**exports, "IMGCLF_S3_CREATE_BUCKET": "1"}))
        store.write_bytes("hello.txt", b"hi")
        assert store.read_bytes("hello.txt") == b"hi"
    finally:
        code, rest = _stop(proc, signal.SIGTERM, lines)
    assert code == 0, rest
    assert not alive(weed_pid)


def test_cli_uses_env_credentials_hides_secret_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = _clean_env(AWS_ACCESS_KEY_ID="IMGCLFDEVFROMENV0001", AWS_SECRET_ACCESS_KEY=SECRET)
    proc, output, _, lines = _start_cli(tmp_path, env)
    weed_pid = int(re.search(r"\(pid (\d+)", output).group(1))  # type: ignore[union-attr]
    try:
        assert SECRET not in output
        exports = _exports(output)
        assert exports["AWS_ACCESS_KEY_ID"] == "IMGCLFDEVFROMENV0001"
        assert "AWS_SECRET_ACCESS_KEY" not in exports
        settings = S3Settings.from_env(
            {**exports, "AWS_SECRET_ACCESS_KEY": SECRET, "IMGCLF_S3_CREATE_BUCKET": "1"}
        )
        S3Store("cli-env", "", settings).write_bytes("k", b"v")
    finally:
        code, rest = _stop(proc, signal.SIGINT, lines)
    assert code == 0, rest
    assert "stopping SeaweedFS" in rest
    assert not alive(weed_pid)
