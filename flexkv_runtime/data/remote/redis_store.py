"""Redis (or any RESP server: Valkey, KeyDB, Dragonfly) as the REMOTE tier's backend.

Gets are one ``MGET`` per batch, copied from the reply into the CPU pool row
and the trailer slot. Puts are pipelined ``SET``s written on a pooled
connection with the pool row and the trailer as separate chunks, so the block
is never copied into a bytes object (redis-py would join them). A server at its
``maxmemory`` either evicts on its own (``allkeys-lru``: later gets miss) or
refuses writes (``noeviction``: the put is ``REFUSED``). Connections time out
after the tier's timeout and are not retried: the tier's circuit breaker
decides when to ask again, and redis-py reconnects on that call.
"""
from __future__ import annotations

from collections.abc import Sequence

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

    def get_into(self, keys: Sequence[str], payloads: Sequence[np.ndarray],
                 trailers: Sequence[np.ndarray]) -> list[Status]:
        statuses = []
        for value, payload, trailer in zip(self._client.mget(keys), payloads, trailers):
            if value is None:
                statuses.append(Status.MISSING)
            elif len(value) != payload.nbytes + trailer.nbytes:
                statuses.append(Status.CORRUPT)
            else:
                payload[:] = np.frombuffer(value, np.uint8, payload.nbytes)
                trailer[:] = np.frombuffer(value, np.uint8, trailer.nbytes, payload.nbytes)
                statuses.append(Status.OK)
        return statuses

    def put_from(self, keys: Sequence[str], payloads: Sequence[np.ndarray],
                 trailers: Sequence[np.ndarray]) -> list[Status]:
        chunks: list[bytes | memoryview] = []
        tail = b""  # each command's trailer and CRLF go out with the next command's prefix
        for key, payload, trailer in zip(keys, payloads, trailers):
            name = key.encode()
            size = payload.nbytes + trailer.nbytes
            chunks.append(tail + b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(name), name, size))
            chunks.append(memoryview(payload))
            tail = trailer.tobytes() + b"\r\n"
        chunks.append(tail)
        pool = self._client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command(chunks)
            return [self._stored(connection) for _ in keys]
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
