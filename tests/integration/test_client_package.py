"""The client package (clients/python) on real servers.

- Installed by pip into a fresh virtual environment from a copy of just protos/ and
  clients/python (a clean checkout: no generated adaccel/, nothing else of the project): no
  torch, only the client's own dependencies; its `adaccel-client` command then talks to a
  router with TLS and a bearer token (a tiny decoder behind it).
- The retry policy against the router's stream cap: RESOURCE_EXHAUSTED with RetryInfo, waited
  and retried (the client from the source tree here, on the repository's stubs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from common.telemetry import null_telemetry
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings
from services.router.server import create_router_server
from services.router.settings import RouterSettings
from tests.integration.test_security import ThrowawayCA

ROOT = Path(__file__).resolve().parents[2]
CLIENT_SRC = ROOT / "clients" / "python" / "src"
if str(CLIENT_SRC) not in sys.path:
    sys.path.insert(0, str(CLIENT_SRC))

from adaccel_client import AdaccelClient, AdaccelError, Block, RetryPolicy  # noqa: E402

TOKEN = "rank-secret-1"
# What may be installed besides the client: its declared dependencies and theirs.
ALLOWED_DISTRIBUTIONS = {"adaccel-client", "grpcio", "grpcio-status", "protobuf", "googleapis-common-protos",
                         "typing-extensions"}


# The fresh venv's processes see nothing of this checkout: `make test` exports PYTHONPATH=<repo>,
# which would put the repository's own generated adaccel/ package on their path.
FRESH_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install clients/python` done in it, from a copy of the two folders
    the package is built from. The venv gets no pip of its own (the test's pip installs into
    it with --python): creating one with pip costs seconds and changes nothing that is tested."""
    root = tmp_path_factory.mktemp("client-package")
    checkout = root / "checkout"
    shutil.copytree(ROOT / "protos", checkout / "protos")
    shutil.copytree(ROOT / "clients" / "python", checkout / "clients" / "python",
                    ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*_pb2*.py*"))
    venv = root / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(_bin(venv, "python")), "install", "-q",
         "--disable-pip-version-check", str(checkout / "clients" / "python")],
        capture_output=True, text=True, timeout=240, env=FRESH_ENV)
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"fresh venv + pip install clients/python: {time.monotonic() - started:.1f} s")
    return venv


def venv_python(venv: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(_bin(venv, "python")), "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=venv.parent, env=FRESH_ENV)


@pytest.mark.slow
def test_the_package_installs_alone_with_its_generated_stubs(client_venv):
    torch = venv_python(client_venv, "import torch")
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    listed = venv_python(client_venv, "import importlib.metadata as m, json; print(json.dumps("
                                      "sorted(d.metadata['Name'] for d in m.distributions())))")
    assert listed.returncode == 0, listed.stderr
    names = {re.sub(r"[-_.]+", "-", n).lower() for n in json.loads(listed.stdout)}
    assert "adaccel-client" in names and names <= ALLOWED_DISTRIBUTIONS, names
    stubs = venv_python(client_venv, "import adaccel_client, adaccel_client.v1.router_pb2 as r; "
                                     "import adaccel_client._stubs as s, importlib.util as u; "
                                     "print(adaccel_client.__version__, s.router_pb2 is r, "
                                     "u.find_spec('adaccel') is None, "
                                     "r.DESCRIPTOR.services_by_name['Router'].full_name)")
    assert stubs.returncode == 0, stubs.stderr
    assert stubs.stdout.split() == ["0.1.0", "True", "True", "adaccel.v1.Router"]


@pytest.fixture(scope="module")
def secure_router(tmp_path_factory, tiny_llama_path, one_torch_thread):
    """A router with TLS and a bearer token in front of one tiny decoder (plaintext behind it)."""
    root = tmp_path_factory.mktemp("secure-router")
    ca = ThrowawayCA(root, "adaccel")
    server = ca.issue("adaccel-router", dns=("localhost",), ips=("127.0.0.1",))
    tokens = root / "tokens"
    tokens.write_text(f"# ads ranking\n{TOKEN}\n")
    decoder = create_decoder_server(DecoderSettings(data_dir=root, model_path=tiny_llama_path,
                                                    torch_threads=1, decoder_id="decoder-client"),
                                    null_telemetry())
    router = create_router_server(RouterSettings(
        data_dir=root, decoder_addrs=[decoder.address], heartbeat_s=0.5, tls_cert_file=server.cert,
        tls_key_file=server.key, auth_tokens_file=tokens), null_telemetry())
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    try:
        yield {"address": router.address, "ca": ca.pem, "token_file": token_file, "root": root}
    finally:
        router.stop(0)
        decoder.stop(0)


def cli(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(_bin(venv, "adaccel-client")), *args], capture_output=True, text=True,
                          timeout=60, cwd=venv.parent, env=FRESH_ENV)


@pytest.mark.slow
def test_cli_from_the_fresh_venv_streams_over_tls_with_a_token(client_venv, secure_router):
    r = secure_router
    common = ["--router", r["address"], "--ca-file", str(r["ca"]), "--token-file", str(r["token_file"])]
    request = ["--block", "instruction:instr-1:Write the selling points.",
               "--block", "item:item-42:Aurora headphones.",
               "--max-new-tokens", "6", "--no-block-reuse"]  # full prefill each time: the same greedy text
    streamed = cli(client_venv, *common, *request)
    assert streamed.returncode == 0, streamed.stderr
    line = re.search(r"-- (\S+) on decoder-client: (\d+) tokens in (\d+) steps", streamed.stderr)
    assert line and int(line.group(2)) == 6 and 1 <= int(line.group(3)) <= 6, streamed.stderr
    as_json = cli(client_venv, *common, *request, "--json")
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["decoder_id"] == "decoder-client" and summary["finish_reason"] == "length"
    assert summary["stats"]["new_tokens"] == 6 and len(summary["token_ids"]) == 6 and summary["attempts"] == 1
    assert summary["text"] == streamed.stdout  # stdout holds exactly the streamed text
    info = cli(client_venv, "info", *common, "--json")
    assert info.returncode == 0, info.stderr
    assert [(rep["decoder_id"], rep["healthy"]) for rep in json.loads(info.stdout)["replicas"]] == [
        ("decoder-client", True)]


@pytest.mark.slow
def test_cli_token_errors_exit_cleanly(client_venv, secure_router):
    r = secure_router
    wrong = r["root"] / "wrong-token"
    wrong.write_text("rank-secret-2\n")
    block = ["--block", "item:item-42:Aurora headphones.", "--max-new-tokens", "2"]
    tls = ["--router", r["address"], "--ca-file", str(r["ca"])]
    cases = [
        ([], 1, "error: UNAUTHENTICATED: authorization: a 'Bearer <token>' header is required"),
        (["--token-file", str(wrong)], 1, "error: UNAUTHENTICATED: authorization: token not accepted"),
        (["--token-file", str(r["root"] / "missing")], 2, "error: [Errno 2] No such file or directory"),
    ]
    for extra, code, message in cases:
        result = cli(client_venv, *tls, *extra, *block)
        assert (result.returncode, result.stdout) == (code, ""), result.stderr
        assert result.stderr.startswith(message), result.stderr
        assert "Traceback" not in result.stderr
        assert "attempts" not in result.stderr  # refused once, not retried


# --- The retry policy against the router's stream cap ------------------------------------------


class HeldDecoder(decoder_pb2_grpc.DecoderServicer):
    """A stand-in decoder whose streams send one delta and then wait for `release`, so that a
    stream holds the router's only slot for as long as the test wants."""

    def __init__(self):
        self.release = threading.Event()
        self.generated = 0

    def Report(self, request, context):
        return decoder_pb2.DecoderReport(decoder_id="held")

    def Generate(self, request, context):
        self.generated += 1
        yield common_pb2.GenerateChunk(delta=common_pb2.TokenDelta(text="x", token_ids=[7]))
        self.release.wait(20)
        yield common_pb2.GenerateChunk(summary=common_pb2.GenerationSummary(
            request_id=request.request_id, text="x", token_ids=[7], decoder_id="held",
            stats=common_pb2.GenerationStats(new_tokens=1, steps=1)))


@pytest.fixture
def capped_router(tmp_path):
    held = HeldDecoder()
    decoder = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    decoder_pb2_grpc.add_DecoderServicer_to_server(held, decoder)
    port = decoder.add_insecure_port("127.0.0.1:0")
    decoder.start()
    router = create_router_server(RouterSettings(data_dir=tmp_path, decoder_addrs=[f"127.0.0.1:{port}"],
                                                 heartbeat_s=0.5, max_streams=1), null_telemetry())
    try:
        yield router.address, held
    finally:
        held.release.set()
        router.stop(0)
        decoder.stop(0)


def test_stream_cap_refusal_is_retried_after_the_routers_retry_delay(capped_router):
    address, held = capped_router
    blocks = [Block("item", "item-1", "Aurora headphones.\n")]
    first_client = AdaccelClient(address, timeout=20)
    first = first_client.generate(blocks, max_new_tokens=1, request_id="holder")
    assert next(first).text == "x"  # streaming: it holds the router's one slot

    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the first refusal frees the slot, then waits for real
        sleeps.append(seconds)
        held.release.set()
        time.sleep(seconds)

    with AdaccelClient(address, timeout=20, sleep=sleep) as client:
        result = client.generate_text(blocks, max_new_tokens=1, request_id="waiter")
        assert result.attempts == 2 and result.summary.request_id == "waiter"
        # The router's RetryInfo (200 ms) was waited, plus at most 20% jitter.
        assert len(sleeps) == 1 and 0.2 <= sleeps[0] <= 0.24
        assert first.summary.request_id == "holder"
        first_client.close()

        # Without retries the refusal reaches the caller with the router's details.
        held.release.clear()
        holder = client.generate(blocks, max_new_tokens=1, request_id="holder-2")
        assert next(holder).text == "x"
        with pytest.raises(AdaccelError) as err:
            AdaccelClient(address, timeout=5, retry=RetryPolicy(max_retries=0)).generate_text(blocks)
        e = err.value
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "STREAM_LIMIT"
        assert e.domain == "adaccel.v1" and e.retry_delay_s == pytest.approx(0.2) and e.attempts == 1
        assert "max_streams=1" in e.message
        holder.cancel()
    assert held.generated == 3  # the refused attempts never reached the decoder
