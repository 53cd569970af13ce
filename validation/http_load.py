"""Steady HTTP load against Triton's KServe v2 infer endpoint, counting who answered.

Threads on keep-alive connections send one request each at a time (closed loop) until stopped
or until a total is reached; every answer is recorded with its status, the `model_version`
Triton names in the body, the request's sticky-key value and its latency.

The senders treat keep-alive as HTTP clients do (urllib3, Go's net/http): a server may close an
idle keep-alive connection at any time (nginx does on every graceful reload, when its old
workers exit), so a connection the server has closed is not reused, and a request that fails on
a reused connection before any byte of an answer came back is sent once more on a new one (the
server never saw it). Such resends are counted (`LoadResult.resent`); any other error is a
failed request. The rollout tests
use it as the steady load under which versions are switched, and bench/gateway.py to compare
the gateway with Triton directly.

    with SteadyLoad("127.0.0.1:18080", "tabular_mlp", body, threads=4) as load:
        ...                                  # switch, promote, roll back
    load.result.failures                     # requests that did not get HTTP 200
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

_TIMEOUT_S = 60.0


def infer_body(input_name: str, tensor: npt.NDArray[Any]) -> bytes:
    """A v2 JSON infer request with one FP32 input."""
    document = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(tensor.shape),
                "datatype": "FP32",
                "data": np.asarray(tensor, dtype=np.float32).ravel().tolist(),
            }
        ]
    }
    return json.dumps(document).encode()


@dataclass(frozen=True)
class Answer:
    status: int
    version: str  # "" when the body named none (an error)
    key: str | None
    latency_s: float
    started_s: float


@dataclass
class LoadResult:
    answers: list[Answer] = field(default_factory=list)
    resent: int = 0  # requests sent again: their reused connection had been closed

    @property
    def failures(self) -> list[Answer]:
        return [answer for answer in self.answers if answer.status != 200]

    def versions(self) -> Counter[str]:
        return Counter(answer.version for answer in self.answers if answer.status == 200)

    def latencies_ms(self) -> list[float]:
        return sorted(answer.latency_s * 1000 for answer in self.answers if answer.status == 200)


class SteadyLoad:
    """`threads` closed-loop senders; `total` requests in all, or until `stop()`."""

    def __init__(
        self,
        address: str,
        model: str,
        body: bytes,
        *,
        threads: int = 4,
        total: int | None = None,
        key_header: str | None = None,
        key_of: Callable[[int], str] | None = None,
    ) -> None:
        self.address = address
        self.path = f"/v2/models/{model}/infer"
        self.body = body
        self.total = total
        self.key_header = key_header
        self.key_of = key_of
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=_TIMEOUT_S + 5)
        return self.result

    def wait(self) -> LoadResult:
        """Until `total` requests were answered."""
        for thread in self._threads:
            thread.join()
        return self.result

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def _next_index(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.total is not None and self._sent >= self.total):
                return None
            self._sent += 1
            return self._sent - 1

    def _run(self) -> None:
        host, port = self.address.rsplit(":", 1)

        def connect() -> http.client.HTTPConnection:
            return http.client.HTTPConnection(host, int(port), timeout=_TIMEOUT_S)

        connection = connect()
        try:
            while (index := self._next_index()) is not None:
                key = self.key_of(index) if self.key_of is not None else None
                headers = {"Content-Type": "application/json"}
                if key is not None and self.key_header is not None:
                    headers[self.key_header] = key
                if _closed_by_server(connection):
                    connection.close()
                    connection = connect()
                started = time.monotonic()
                reused = connection.sock is not None
                answer = self._send(connection, headers, key, started)
                if answer is None and reused:  # closed under us before any answer: resend
                    with self._lock:
                        self.result.resent += 1
                    connection.close()
                    connection = connect()
                    answer = self._send(connection, headers, key, started)
                if answer is None:
                    answer = Answer(0, "", key, time.monotonic() - started, started)
                if answer.status == 0:  # the connection broke: a new one for the next request
                    connection.close()
                    connection = connect()
                with self._lock:
                    self.result.answers.append(answer)
        finally:
            connection.close()

    def _send(
        self,
        connection: http.client.HTTPConnection,
        headers: dict[str, str],
        key: str | None,
        started: float,
    ) -> Answer | None:
        """The answer; None when the connection failed before any byte of an answer came."""
        try:
            connection.request("POST", self.path, body=self.body, headers=headers)
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            return None
        except (OSError, http.client.HTTPException):
            return Answer(0, "", key, time.monotonic() - started, started)
        try:
            payload = response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            return Answer(0, "", key, time.monotonic() - started, started)
        latency = time.monotonic() - started
        version = ""
        if status == 200:
            version = str(json.loads(payload).get("model_version", ""))
        return Answer(status, version, key, latency, started)


def _closed_by_server(connection: http.client.HTTPConnection) -> bool:
    """Whether the server closed this idle keep-alive connection (urllib3's check): an idle
    connection that is readable has nothing to say but its end."""
    sock = connection.sock
    if sock is None:
        return False
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)
