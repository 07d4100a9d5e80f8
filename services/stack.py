"""The local stack: embedded broker + pool + kv-store + decoder(s) + router as real processes on loopback.

    python -m services.stack serve   # all services in the foreground; Ctrl-C stops all
    python -m services.stack job     # start all, run the main job through the router, print its table, stop

Tests use `Stack` directly. Each service writes its log to <data-dir>/logs/<name>.log and serves
Prometheus metrics on its own loopback port (printed by `serve`). OpenTelemetry export is off
here unless ADACCEL_TELEMETRY_EXPORTER (or ADACCEL_OTLP_ENDPOINT) is set: the console exporter
would print every span of every request into the service logs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from adaccel.v1 import decoder_pb2, kvstore_pb2, pool_pb2, router_pb2
from common.broker import EmbeddedBroker, free_port
from common.child_processes import ending_with_parent
from common.modeling.default_model import default_model_path
from common.rpc.channels import health_status, open_channel

SERVICE_NAMES = {
    "pool": pool_pb2.DESCRIPTOR.services_by_name["Pool"].full_name,
    "kvstore": kvstore_pb2.DESCRIPTOR.services_by_name["KvStore"].full_name,
    "decoder": decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name,
    "router": router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
}


@dataclass
class ServiceProcess:
    name: str  # instance name, e.g. decoder-0
    kind: str  # pool | kvstore | decoder | router
    process: subprocess.Popen
    port_file: Path
    log_path: Path
    port: int = 0
    metrics_port: int = 0
    # The ADACCEL_* settings it was started with (without the prefix), so it can be started again.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Stack:
    data_dir: Path
    model_path: Path
    decoders: int = 1
    # Extra ADACCEL_* settings per service kind, e.g. {"decoder": {"MAX_QUEUE": "4"}}.
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # A decoder loads its model and may calibrate block reuse first (minutes on a CPU without a
    # stored gate result; `make model` stores one).
    start_timeout_s: float = 600.0
    broker: EmbeddedBroker | None = None
    processes: list[ServiceProcess] = field(default_factory=list)

    def start(self) -> Stack:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "run").mkdir(parents=True, exist_ok=True)
        try:
            self.broker = EmbeddedBroker(log_path=self.data_dir / "logs" / "broker.log").start()
            # Decoders keep pool snapshots fresh from the pool service, so its port is chosen up
            # front: everything still starts in parallel.
            pool_port = free_port()
            pool = self._spawn("pool", "pool", {"MODEL_PATH": str(self.model_path), "PORT": str(pool_port)})
            # Same for the kv-store: decoders look prompt blocks up there and publish new ones.
            kvstore_port = free_port()
            kvstore = self._spawn("kvstore", "kvstore", {"PORT": str(kvstore_port)})
            decoders = [self._spawn(f"decoder-{i}", "decoder", {"MODEL_PATH": str(self.model_path),
                                                                 "DECODER_ID": f"decoder-{i}",
                                                                 "POOL_ADDR": f"127.0.0.1:{pool_port}",
                                                                 "KVSTORE_ADDRS": f"127.0.0.1:{kvstore_port}"})
                        for i in range(self.decoders)]
            for proc in [pool, kvstore, *decoders]:
                self._wait_serving(proc)
            router = self._spawn("router", "router",
                                 {"DECODER_ADDRS": ",".join(d.address for d in decoders), "HEARTBEAT_S": "0.5"})
            self._wait_serving(router)
        except BaseException:
            self.stop()
            raise
        return self

    def address(self, name: str) -> str:
        return next(p.address for p in self.processes if p.name == name)

    def process(self, name: str) -> ServiceProcess:
        return next(p for p in self.processes if p.name == name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> ServiceProcess:
        """Signals one service (SIGKILL: no cleanup at all) and waits for it to exit."""
        proc = self.process(name)
        if proc.process.poll() is None:
            proc.process.send_signal(sig)
            proc.process.wait()
        return proc

    def restart(self, name: str) -> ServiceProcess:
        """Starts an exited service again with its settings on its old port (peers keep its address)."""
        old = self.process(name)
        if old.process.poll() is None:
            raise RuntimeError(f"{name} is still running")
        self.processes.remove(old)
        proc = self._spawn(old.name, old.kind, {**old.settings, "PORT": str(old.port)})
        self._wait_serving(proc)
        return proc

    def _spawn(self, name: str, kind: str, settings: dict[str, str]) -> ServiceProcess:
        port_file = self.data_dir / "run" / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.data_dir / "logs" / f"{name}.log"
        metrics_port = free_port()
        env = dict(os.environ)
        env.setdefault("ADACCEL_TELEMETRY_EXPORTER", "none")
        env.update({
            "ADACCEL_METRICS_PORT": str(metrics_port),
            "ADACCEL_PORT": "0",
            "ADACCEL_PORT_FILE": str(port_file),
            "ADACCEL_DATA_DIR": str(self.data_dir),
            "ADACCEL_KAFKA_BOOTSTRAP": self.broker.bootstrap if self.broker else "",
            "ADACCEL_TELEMETRY_INTERVAL_S": "30",
            "PYTHONUNBUFFERED": "1",
        })
        env.update({f"ADACCEL_{k}": v for k, v in settings.items()})
        env.update({f"ADACCEL_{k}": v for k, v in self.extra_env.get(kind, {}).items()})
        log = open(log_path, "ab")
        process = subprocess.Popen(ending_with_parent([sys.executable, "-m", f"services.{kind}"]), env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = ServiceProcess(name, kind, process, port_file, log_path, metrics_port=metrics_port,
                              settings=dict(settings))
        self.processes.append(proc)
        return proc

    def _wait_serving(self, proc: ServiceProcess) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not proc.port_file.exists():
            self._check_alive(proc, deadline)
            time.sleep(0.05)
        proc.port = int(proc.port_file.read_text())
        channel = open_channel(proc.address)
        try:
            while health_status(channel, SERVICE_NAMES[proc.kind]) != "SERVING":
                self._check_alive(proc, deadline)
                time.sleep(0.1)
        finally:
            channel.close()

    def _check_alive(self, proc: ServiceProcess, deadline: float) -> None:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} not SERVING after {self.start_timeout_s}s:\n{proc.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        # Tier by tier: router first (no new work), then decoders (they still call the pool and the
        # kv-store while draining), then the stores, then the broker. Stopping all at once let a
        # decoder's background refresh hit a pool service that was already gone.
        tiers = [("router",), ("decoder",), ("pool", "kvstore")]
        deadline = time.monotonic() + grace_s
        for kinds in tiers:
            procs = [p for p in self.processes if p.kind in kinds]
            for proc in procs:
                if proc.process.poll() is None:
                    proc.process.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.process.kill()
                    proc.process.wait()
        for proc in self.processes:  # anything of a kind not in the tiers
            if proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait()
        self.processes.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def resolve_model(data_dir: Path, model_path: Path | None) -> Path:
    """The given model, else the default model `make model` converts, else a labelled random stand-in."""
    if model_path is not None:
        return model_path
    default = default_model_path(data_dir)
    if (default / "config.json").is_file():
        return default
    from common.modeling.tiny import save_tiny_model

    stand_in = data_dir / "models" / "tiny-random-llama"
    if not (stand_in / "config.json").is_file():
        save_tiny_model(stand_in, "llama")
    print(f"NOTE: no default model under {default}; using a tiny RANDOM-weight stand-in ({stand_in})")
    return stand_in


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (a supervisor, `kill`, a closed terminal) unwind like Ctrl-C, so the
    `with stack` block stops every service and the broker; with the default handlers the parent
    died alone and left them all running."""

    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
    # A process started in the background (nohup, `cmd &`, some CI runners) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt: restore Ctrl-C explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["serve", "job"])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ADACCEL_DATA_DIR", "data")))
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--decoders", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="job: a small sample (end-to-end tests)")
    args, job_args = parser.parse_known_args(argv)
    stop_on_signals()
    data_dir = args.data_dir.resolve()
    model_path = resolve_model(data_dir, args.model_path)
    stack = Stack(data_dir=data_dir, model_path=model_path, decoders=args.decoders)
    print(f"starting broker and services (model {model_path}) ...", flush=True)
    t0 = time.perf_counter()
    with stack:
        print(f"stack up in {time.perf_counter() - t0:.1f}s: router on {stack.address('router')}, "
              f"broker on {stack.broker.bootstrap}, logs in {data_dir / 'logs'}", flush=True)
        if args.command == "serve":
            for proc in stack.processes:
                print(f"  {proc.name}: gRPC {proc.address}, "
                      f"metrics http://127.0.0.1:{proc.metrics_port}/metrics")
            print("serving; Ctrl-C or SIGTERM stops all", flush=True)
            try:
                while all(p.process.poll() is None for p in stack.processes):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        else:
            from services.main_job.job import run_job

            run_job(stack, data_dir, quick=args.quick, extra_args=job_args)


if __name__ == "__main__":
    main()
