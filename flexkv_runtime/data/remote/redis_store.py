"""Redis (or any RESP server: Valkey, KeyDB, Dragonfly) as the REMOTE tier's backend.

Both directions bypass redis-py's reply objects on a pooled connection, so a
block is never copied into a bytes object. Gets are one ``MGET`` per batch
whose reply is read off the socket straight into the CPU pool row and its tail
(redis-py would allocate each value, fault its pages in and leave the copy to
us). Puts are pipelined ``SET``s written from the pool rows (redis-py would
copy each into the command). A server at its
``maxmemory`` either evicts on its own (``allkeys-lru``: later gets miss) or
refuses writes (``noeviction``: the put is ``REFUSED``). Connections time out
after the tier's timeout and are not retried: the tier's circuit breaker
decides when to ask again, and redis-py reconnects on that call.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from flexkv_runtime.data.remote.backend import RemoteBackend, Status


class RedisBackend(RemoteBackend):
    name = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, timeout_s: float = 1.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self._errors = redis.exceptions
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0))

    def get_into(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> list[Status]:
        with self._connection() as connection:
            connection.send_command("MGET", *keys)
            reply = _Reply(connection._sock)
            if (header := reply.line()) != b"*%d" % len(keys):
                raise self._errors.ResponseError(f"unexpected MGET reply {header[:200]!r}")
            return [reply.value_into(value) for value in values]

    def put_from(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> list[Status]:
        chunks: list[bytes | memoryview] = []
        crlf = b""  # each command's closing CRLF goes out with the next command's prefix
        for key, value in zip(keys, values):
            name = key.encode()
            chunks.append(crlf + b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(name), name, value.nbytes))
            chunks.append(memoryview(value))
            crlf = b"\r\n"
        chunks.append(crlf)
        with self._connection() as connection:
            connection.send_packed_command(chunks)
            return [self._stored(connection) for _ in keys]

    @contextmanager
    def _connection(self):
        pool = self._client.connection_pool
        connection = pool.get_connection()
        try:
            yield connection
        except BaseException:
            connection.disconnect()  # replies may be left unread: never hand this connection out again
            raise
        finally:
            pool.release(connection)

    def _stored(self, connection) -> Status:
        try:
            connection.read_response()
        except self._errors.OutOfMemoryError:
            return Status.REFUSED
        except self._errors.ResponseError:
            return Status.FAILED
        return Status.OK

    def exists(self, keys: Sequence[str]) -> list[Status]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [Status.OK if found else Status.MISSING for found in pipe.execute()]

    def close(self) -> None:
        self._client.close()


class _Reply:
    """One RESP reply read off a socket: lines through a small buffer, bulk values straight into arrays."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def value_into(self, value: np.ndarray) -> Status:
        """The next bulk value into ``value``; a nil is ``MISSING``, another size ``CORRUPT``."""
        header = self.line()
        if header in (b"$-1", b"_"):  # nil in RESP2, RESP3
            return Status.MISSING
        if header[:1] != b"$":
            raise ConnectionError(f"unexpected MGET value header {header[:40]!r}")
        size = int(header[1:])
        if size != value.nbytes:
            self._read_into(memoryview(bytearray(size + 2)))
            return Status.CORRUPT
        self._read_into(memoryview(value))
        if self.line():
            raise ConnectionError("MGET value longer than its header says")
        return Status.OK

    def _read_into(self, view: memoryview) -> None:
        done = min(len(self._buffer), len(view))
        view[:done] = self._buffer[:done]
        del self._buffer[:done]
        while done < len(view):
            got = self._sock.recv_into(view[done:])
            if not got:
                raise ConnectionError("Redis closed the connection mid-reply")
            done += got

    def _fill(self) -> None:
        chunk = self._sock.recv(_CHUNK)
        if not chunk:
            raise ConnectionError("Redis closed the connection mid-reply")
        self._buffer += chunk


#: bytes asked of the socket when reading reply headers (a value's first bytes come along)
_CHUNK = 64 << 10
