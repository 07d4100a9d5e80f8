"""AdaccelClient: the Router's typed client (TLS, bearer token, deadlines, retries)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from adaccel_client._stubs import common_pb2, router_pb2, router_pb2_grpc
from adaccel_client.errors import AdaccelError
from adaccel_client.retry import RetryPolicy
from adaccel_client.types import (
    Advanced,
    Block,
    Delta,
    Mode,
    Relaxed,
    Result,
    RouterInfo,
    Sampling,
    Summary,
    build_request,
)

DEFAULT_TIMEOUT_S = 60.0
# Fail fast when the router is down instead of queueing behind gRPC's reconnect backoff (up to
# two minutes by default); the retry policy decides what to do with UNAVAILABLE.
_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000))


def _read(path: str | os.PathLike | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


class _Token:
    """The bearer token: given, or read from a file (its first line that is neither blank nor a
    '#' comment). The file is read at construction, so that a missing or empty one fails there,
    and read again before a call when its inode, mtime or size changed, so that a rotated secret
    (a Kubernetes Secret volume swaps the file in place) is sent from the next call on. A file
    missing or empty for a moment mid-rotation keeps the previous token."""

    def __init__(self, token: str | None, path: str | os.PathLike | None):
        if token is not None and path is not None:
            raise ValueError("give token or token_file, not both")
        if token is not None and not token.strip():
            raise ValueError("token: empty")
        self._token = token.strip() if token is not None else None
        self._path = Path(path) if path is not None else None
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        if self._path is not None:
            self._reload(strict=True)

    def _reload(self, strict: bool) -> None:
        assert self._path is not None
        try:
            stat = self._path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            lines = (line.strip() for line in self._path.read_text().splitlines())
            token = next((line for line in lines if line and not line.startswith("#")), None)
        except OSError:
            if strict:
                raise
            return
        if token is None:
            if strict:
                raise ValueError(f"token file {self._path}: no token in it")
            return
        self._token, self._stamp = token, stamp

    def value(self) -> str | None:
        if self._path is not None:
            with self._lock:
                self._reload(strict=False)
        return self._token


class AdaccelClient:
    """A client of the Router at `target` ("host:port").

    TLS: on when `ca_file` (the CA that signed the router's certificate), a client certificate or
    `tls=True` (the system's CAs) is given; `client_cert_file` + `client_key_file` add this
    client's certificate for a router that demands mutual TLS; `server_name` checks the router's
    certificate for that name instead of the dialled host. Auth: `token`, or `token_file` (see
    _Token), sent as `authorization: Bearer <token>` on every call. `timeout`: the default
    deadline of a call in seconds, all its attempts together (None: no deadline; the router then
    applies its own). `retry`: see adaccel_client.retry. A `channel` of the caller's replaces the
    one built here (and the TLS arguments with it). `clock`, `sleep`, `rng`: for tests.

    Thread-safe; close() (or `with`) closes the channel.
    """

    def __init__(self, target: str, *, ca_file: str | os.PathLike | None = None,
                 client_cert_file: str | os.PathLike | None = None,
                 client_key_file: str | os.PathLike | None = None, tls: bool | None = None,
                 server_name: str | None = None, token: str | None = None,
                 token_file: str | os.PathLike | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, channel: grpc.Channel | None = None,
                 options: Sequence[tuple[str, Any]] = (), clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        if (client_cert_file is None) != (client_key_file is None):
            raise ValueError("client_cert_file and client_key_file: give both or neither")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout: must be positive (or None for no deadline)")
        self.target = target
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._token = _Token(token, token_file)
        self._clock, self._sleep = clock, sleep
        self._rng = rng if rng is not None else random.Random()
        if channel is not None:
            if ca_file or client_cert_file or tls or server_name:
                raise ValueError("channel= replaces the TLS arguments; configure TLS on that channel")
            self._channel, self._owns_channel = channel, False
        else:
            self._channel, self._owns_channel = self._open(target, ca_file, client_cert_file, client_key_file,
                                                           tls, server_name, options), True
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    @staticmethod
    def _open(target, ca_file, cert_file, key_file, tls, server_name, options) -> grpc.Channel:
        from adaccel_client import __version__

        channel_options = [*_CHANNEL_OPTIONS, ("grpc.primary_user_agent", f"adaccel-client/{__version__}"),
                           *options]
        if server_name:
            channel_options.append(("grpc.ssl_target_name_override", server_name))
        if tls is None:
            tls = ca_file is not None or cert_file is not None
        if not tls:
            if ca_file is not None or cert_file is not None or server_name:
                raise ValueError("ca_file / client certificate / server_name need TLS (tls=False was given)")
            return grpc.insecure_channel(target, options=channel_options)
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca_file),
                                                   private_key=_read(key_file),
                                                   certificate_chain=_read(cert_file))
        return grpc.secure_channel(target, credentials, options=channel_options)

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> AdaccelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metadata(self, extra: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        token = self._token.value()
        return ((("authorization", f"Bearer {token}"),) if token else ()) + tuple(extra)

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else self._clock() + timeout

    def _remaining(self, deadline: float | None, attempts: int) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise AdaccelError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the call's deadline passed before its next attempt", attempts=attempts)
        return remaining

    def _wait_or_raise(self, error: AdaccelError, deadline: float | None, cause: BaseException) -> None:
        delay = self.retry.next_delay_s(error, attempts=error.attempts, now=self._clock(), deadline=deadline,
                                        rng=self._rng)
        if delay is None:
            raise error from cause
        self._sleep(delay)

    def generate(self, blocks: Iterable[Block | tuple[Any, str, str]], *, pool_key: str = "", task: str = "",
                 max_new_tokens: int = 64, mode: Mode | None = None, relaxed: Relaxed | None = None,
                 sampling: Sampling | None = None, advanced: Advanced | None = None, request_id: str = "",
                 publish: bool = False, raw_prompt: bool = False, timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] = ()) -> Generation:
        """Starts a generation (see build_request for the inputs; `advanced`: benchmarks and
        operators only). Iterate the result for its Delta pieces as they stream; its `summary`
        comes after the last. The call is made on the first next(); errors raise AdaccelError
        from there. `timeout`: this call's deadline in seconds (default: the client's)."""
        request = build_request(blocks, pool_key=pool_key, task=task, max_new_tokens=max_new_tokens, mode=mode,
                                relaxed=relaxed, sampling=sampling, advanced=advanced, request_id=request_id,
                                publish=publish, raw_prompt=raw_prompt)
        return self.generate_request(request, timeout=timeout, metadata=metadata)

    def generate_request(self, request: common_pb2.GenerateRequest, *, timeout: float | None = None,
                         metadata: Iterable[tuple[str, str]] = ()) -> Generation:
        """generate() for a GenerateRequest built by the caller."""
        return Generation(self, request, timeout, tuple(metadata))

    def generate_text(self, blocks: Iterable[Block | tuple[Any, str, str]], *, pool_key: str = "", task: str = "",
                      max_new_tokens: int = 64, mode: Mode | None = None, relaxed: Relaxed | None = None,
                      sampling: Sampling | None = None, advanced: Advanced | None = None,
                      request_id: str = "", publish: bool = False, raw_prompt: bool = False,
                      timeout: float | None = None, metadata: Iterable[tuple[str, str]] = ()) -> Result:
        """generate(), waited for: the whole text and the summary."""
        generation = self.generate(blocks, pool_key=pool_key, task=task, max_new_tokens=max_new_tokens, mode=mode,
                                   relaxed=relaxed, sampling=sampling, advanced=advanced,
                                   request_id=request_id, publish=publish, raw_prompt=raw_prompt,
                                   timeout=timeout, metadata=metadata)
        summary = generation.summary
        return Result(text=summary.text, token_ids=summary.token_ids, summary=summary,
                      attempts=generation.attempts)

    def info(self, *, timeout: float | None = None, metadata: Iterable[tuple[str, str]] = ()) -> RouterInfo:
        """The router's scheduling policy and decoder replicas (retried like Generate)."""
        deadline, attempts = self._deadline(timeout), 0
        while True:
            attempts += 1
            try:
                reply = self._stub.Info(router_pb2.RouterInfoRequest(),
                                        timeout=self._remaining(deadline, attempts),
                                        metadata=self._metadata(metadata))
                return RouterInfo.from_proto(reply)
            except grpc.RpcError as exc:
                self._wait_or_raise(AdaccelError.from_rpc_error(exc, attempts=attempts), deadline, exc)


class Generation:
    """One Generate call. Iterating it yields Delta pieces as they stream; `summary` is the final
    Summary (reading it first waits for, and drops, the deltas not iterated yet). `attempts`: calls
    made so far (retries are made only before the first delta). Leaving early: cancel(), or
    `with client.generate(...) as generation:`."""

    def __init__(self, client: AdaccelClient, request: common_pb2.GenerateRequest, timeout: float | None,
                 metadata: tuple[tuple[str, str], ...]):
        self.request = request
        self.attempts = 0
        self._client = client
        self._timeout = timeout
        self._metadata = metadata
        self._summary: Summary | None = None
        self._stream = self._run()

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        return next(self._stream)

    @property
    def summary(self) -> Summary:
        if self._summary is None:
            for _ in self._stream:
                pass
        if self._summary is None:  # the stream was cancelled
            raise AdaccelError(grpc.StatusCode.CANCELLED, "the generation was cancelled before its summary",
                               attempts=self.attempts)
        return self._summary

    def result(self) -> Result:
        summary = self.summary
        return Result(text=summary.text, token_ids=summary.token_ids, summary=summary, attempts=self.attempts)

    def cancel(self) -> None:
        """Ends the call (the router stops the decoder's work); iteration stops."""
        self._stream.close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def _run(self) -> Iterator[Delta]:
        client = self._client
        deadline = client._deadline(self._timeout)
        while True:
            self.attempts += 1
            streamed = False
            finished = False
            call = None
            try:
                call = client._stub.Generate(self.request, timeout=client._remaining(deadline, self.attempts),
                                             metadata=client._metadata(self._metadata))
                for chunk in call:
                    part = chunk.WhichOneof("chunk")
                    if part == "delta":
                        streamed = True
                        yield Delta(chunk.delta.text, tuple(chunk.delta.token_ids))
                    elif part == "summary":
                        self._summary = Summary.from_proto(chunk.summary)
                finished = True
                if self._summary is None:
                    raise AdaccelError(grpc.StatusCode.INTERNAL, "the stream ended without a summary",
                                       attempts=self.attempts, output_started=streamed)
                return
            except grpc.RpcError as exc:
                error = AdaccelError.from_rpc_error(exc, attempts=self.attempts, output_started=streamed)
                finished = True
                client._wait_or_raise(error, deadline, exc)
            finally:
                if call is not None and not finished:  # left early (cancel, break, an exception)
                    call.cancel()
