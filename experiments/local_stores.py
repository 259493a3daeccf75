"""Throwaway stores on this machine, for tests, benchmarks and trying the REMOTE tier out.

``start_redis`` and ``start_mooncake`` run the servers on free loopback ports
(Mooncake: a ``mooncake_master`` and one ``mooncake_client`` storage node,
peers found by ``P2PHANDSHAKE``) and return a ``LocalStore`` that kills,
restarts, pauses and resumes them by PID. Nothing in the runtime uses this.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 30.0


class StoreUnavailable(RuntimeError):
    """The store's server binaries or client library are not installed here."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One server process: ``ready(process)`` says when it answers (it may read ``new_log()``)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, ready: Callable[[ServerProcess], bool]) -> None:
        self.name, self.argv, self.ready = name, argv, ready
        self.log_path = log_dir / f"{name}.log"
        self.log_start = 0
        self.proc: subprocess.Popen | None = None

    def new_log(self) -> str:
        """What the server logged since its last start."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def start(self) -> None:
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                if self.ready(self):
                    return
            time.sleep(0.05)  # polling another process's readiness: nothing to wait on
        self.kill()
        raise RuntimeError(f"{self.name} did not start (exit code {self.proc.returncode}):\n{self.new_log()[-3000:]}")

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class LocalStore:
    """A store's processes, the backend options that reach it, and its own client (``raw``)."""

    def __init__(self, backend: str, processes: list[ServerProcess], options: dict[str, Any],
                 raw: Callable[[], Any]) -> None:
        self.backend, self.processes, self.options = backend, processes, options
        self._connect_raw = raw
        self._raw = None

    def remote(self, **overrides: Any) -> dict[str, Any]:
        """A runtime ``remote`` section for this store."""
        return {"capacity_blocks": 1024, "backend": self.backend, self.backend: dict(self.options), **overrides}

    def raw(self) -> Any:
        """The backend's own client, connected on first use."""
        if self._raw is None:
            self._raw = self._connect_raw()
        return self._raw

    def start(self) -> None:
        try:
            for process in self.processes:
                process.start()
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        for process in reversed(self.processes):
            process.kill()

    def pause(self) -> None:
        for process in self.processes:
            process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        for process in self.processes:
            process.signal(signal.SIGCONT)

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def mooncake_binary(name: str) -> str | None:
    """The server binaries ship inside the ``mooncake`` Python package."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / name
    return str(path) if os.access(path, os.X_OK) else None


def start_redis(log_dir: Path, *args: str) -> LocalStore:
    """``redis-server`` without persistence; ``args`` are extra server options (``--maxmemory`` ...)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StoreUnavailable("redis-server is not installed (apt-get install redis-server)")
    try:
        import redis
    except ImportError:
        raise StoreUnavailable("the redis client is not installed (pip install -e '.[remote]')") from None
    port = free_port()
    client = redis.Redis(port=port, socket_timeout=5)
    server = ServerProcess("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                     "--appendonly", "no", *args], log_dir, lambda _: client.ping())
    store = LocalStore("redis", [server], {"url": f"redis://127.0.0.1:{port}/0"}, lambda: client)
    store.start()
    return store


def start_mooncake(log_dir: Path, segment: str = "1 GB") -> LocalStore:
    """A master and one storage node holding ``segment`` (Mooncake's smallest is 16 MB)."""
    master_bin, node_bin = mooncake_binary("mooncake_master"), mooncake_binary("mooncake_client")
    if master_bin is None or node_bin is None:
        raise StoreUnavailable("Mooncake is not installed (pip install -e '.[remote]')")
    rpc, metrics, storage = free_port(), free_port(), free_port()
    master = ServerProcess("mooncake_master", [
        master_bin, "--rpc_address=127.0.0.1", f"--rpc_port={rpc}", "--metrics_host=127.0.0.1",
        f"--metrics_port={metrics}", "--default_kv_lease_ttl=500ms",
    ], log_dir, lambda _: urllib.request.urlopen(f"http://127.0.0.1:{metrics}/health", timeout=1).status == 200)
    node = ServerProcess("mooncake_client", [
        node_bin, "--host=127.0.0.1", f"--port={storage}", f"--global_segment_size={segment}",
        f"--master_server_address=127.0.0.1:{rpc}", "--metadata_server=P2PHANDSHAKE", "--protocol=tcp",
    ], log_dir, lambda node: "Starting real client service" in node.new_log())

    def raw():
        from mooncake.store import MooncakeDistributedStore

        client = MooncakeDistributedStore()
        code = client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", f"127.0.0.1:{rpc}")
        if code != 0:
            raise RuntimeError(f"Mooncake raw client setup failed with code {code}")
        return client

    store = LocalStore("mooncake", [master, node], {"master": f"127.0.0.1:{rpc}"}, raw)
    store.start()
    return store


def start_store(backend: str, log_dir: Path, **options: Any) -> LocalStore:
    """``options``: ``redis_args`` (extra server options) or ``segment`` (Mooncake storage size)."""
    if backend == "redis":
        return start_redis(log_dir, *options.get("redis_args", ()))
    if backend == "mooncake":
        return start_mooncake(log_dir, options.get("segment", "1 GB"))
    raise ValueError(f"unknown store {backend!r}; valid: ['mooncake', 'redis']")
