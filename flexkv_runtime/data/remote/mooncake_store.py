"""Mooncake Store as the REMOTE tier's backend, through its zero-copy batch calls.

The engine is a client that contributes no memory (``global_segment_size=0``):
values live in the store's own processes (``mooncake_client`` storage nodes
registered with a ``mooncake_master``), so they outlive any engine and every
engine that reaches the master shares them. Peers find each other with
``P2PHANDSHAKE`` metadata, so no HTTP metadata server is needed.

The CPU pool is registered once (``register_buffer``); a get lands a value
straight in its pool row and the row's tail (``batch_get_into``), a put sends
it from there (``batch_put_from``): one buffer per key, no copy on either side. The client
reconnects to a master that restarts; the first call connects, so an engine
starts even while the store is down, and a failed connect is tried again on the
circuit breaker's next probe.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence

import numpy as np

from flexkv_runtime.data.remote.backend import RemoteBackend, Status

log = logging.getLogger(__name__)

# Mooncake's ErrorCode values the tier tells apart; any other negative code is a failure
_NO_SPACE = -200  # NO_AVAILABLE_HANDLE: no segment has room
_BUFFER_TOO_SMALL = -600  # INVALID_PARAMS: the stored value is larger than the buffers
_NOT_READY = -703  # REPLICA_IS_NOT_READY: another engine is still writing it
_NOT_FOUND = -704  # OBJECT_NOT_FOUND
_ALREADY_STORED = -705  # OBJECT_ALREADY_EXISTS: keys name their contents, so this is a success
#: how long connecting waits for the master's port to answer
CONNECT_TIMEOUT_S = 1.0


class MooncakeBackend(RemoteBackend):
    name = "mooncake"

    def __init__(self, master: str, *, local_hostname: str = "127.0.0.1", protocol: str = "tcp",
                 device: str = "", metadata_server: str = "P2PHANDSHAKE") -> None:
        """``master``: host:port of ``mooncake_master``; ``local_hostname``: this host's address as the
        store's peers reach it; ``device``: RDMA devices for ``protocol=rdma``."""
        self.master = master
        self._setup_args = (local_hostname, metadata_server, 0, 0, protocol, device, master)
        self._connecting = threading.Lock()
        self._lock = threading.Lock()  # the client and the registered regions
        self._store = None
        self._regions: list[tuple[int, int]] = []

    def _client(self):
        """The connected client; the first call connects (one attempt: the caller's circuit breaker retries),
        calls meanwhile wait for that attempt (their guard gives up on them at its timeout)."""
        store = self._store
        if store is not None:
            return store
        if not self._connecting.acquire(blocking=False):
            with self._connecting:
                if self._store is None:
                    raise ConnectionError(f"could not connect to the Mooncake master {self.master}")
                return self._store
        try:
            from mooncake.store import MooncakeDistributedStore

            # setup holds the GIL, the whole process, while it waits for a master that is not there:
            # knock first; and one attempt, not the ~90 s of retries it makes by default
            host, _, port = self.master.rpartition(":")
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
            os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", "1")
            store = MooncakeDistributedStore()
            code = store.setup(*self._setup_args)
            if code != 0:
                raise ConnectionError(f"Mooncake store setup failed (code {code}) with master {self.master}")
            with self._lock:
                for ptr, size in self._regions:
                    self._register_with(store, ptr, size)
                self._store = store
            log.info("Mooncake store client connected to master %s", self.master)
            return store
        finally:
            self._connecting.release()

    @staticmethod
    def _register_with(store, ptr: int, size: int) -> None:
        code = store.register_buffer(ptr, size)
        if code != 0:
            raise ConnectionError(f"Mooncake register_buffer of {size} bytes failed (code {code})")

    def register(self, buffer: np.ndarray) -> None:
        region = (buffer.ctypes.data, buffer.nbytes)
        with self._lock:
            self._regions.append(region)
            if self._store is not None:
                self._register_with(self._store, *region)

    def get_into(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> list[Status]:
        sizes = [value.nbytes for value in values]
        codes = self._client().batch_get_into(list(keys), [value.ctypes.data for value in values], sizes)
        return [_read_status(code, size) for code, size in zip(codes, sizes)]

    def put_from(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> list[Status]:
        codes = self._client().batch_put_from(list(keys), [value.ctypes.data for value in values],
                                              [value.nbytes for value in values])
        return [Status.OK if code in (0, _ALREADY_STORED) else Status.REFUSED if code == _NO_SPACE
                else Status.FAILED for code in codes]

    def exists(self, keys: Sequence[str]) -> list[Status]:
        codes = self._client().batch_is_exist(list(keys))
        return [Status.OK if code == 1 else Status.MISSING if code == 0 else Status.FAILED for code in codes]

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()


def _read_status(code: int, expected: int) -> Status:
    if code == expected:
        return Status.OK
    if code in (_NOT_FOUND, _NOT_READY):
        return Status.MISSING
    if code >= 0 or code == _BUFFER_TOO_SMALL:
        return Status.CORRUPT
    return Status.FAILED
