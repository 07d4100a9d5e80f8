#!/usr/bin/env bash
# The GPU checks, on a lent CUDA machine, in one script within 10 minutes:
#   1. the lossless property test on CUDA (strict output == greedy, tiny Llama and Qwen2),
#   2. the Triton kernels against their torch references, fp32 and the fp16/bf16 GPU-only paths,
#      and the whole block assembly on the kernels,
#   3. bench-projection (a realistic shape's step-cost curve on this GPU, in bf16),
#   4. bench-decode and bench-prefill on the default model (SmolLM2-135M-Instruct) in bf16, sized
#      to fit,
# writing bench/results/*-cuda.json (and $OUT/ when the device tool runs it). Where no CUDA GPU is
# present it fails at once and says so: it never reports CPU figures as GPU ones.
#
# Usage:
#   bench/gpu_check.sh stage     here, on the development machine: the Python packages that the
#                                GPU image lacks (as Python 3.12 wheels) and the default model's
#                                GGUF file, split to fit the device tool's 64 MiB per call, under
#                                .gpu/ (git-ignored)
#   bench/gpu_check.sh receive   there: keeps the .gpu/ parts this call carried in /tmp/adaccel-gpu
#                                (the machine stays warm ~30 s between calls)
#   bench/gpu_check.sh run       there: receive, then install, convert the model, run the checks
#
# With the device tool (whose calls carry at most 64 MiB each): `run` with carry [".gpu/call1"] and
# command `bench/gpu_check.sh receive`, then at once (the machine stays warm ~30 s) carry
# [".gpu/call2"] and command `bench/gpu_check.sh run`, timeout_s 600. Where the model is already a
# checkpoint directory there (ADACCEL_MODEL_PATH) and the workload under ADACCEL_DATA_DIR, `run`
# needs no parts.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=.gpu
KEEP=/tmp/adaccel-gpu
RESULTS=bench/results
PART_BYTES=$((55 * 1024 * 1024))
# What the services and benches import that the GPU image (torch, transformers, triton, numpy, rich,
# tqdm, pytest, hypothesis, grpcio, ...) does not hold, at the lock's versions.
WHEELS=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
        protobuf grpcio grpcio-tools grpcio-health-checking grpcio-reflection grpcio-status
        googleapis-common-protos python-json-logger gguf opentelemetry-api opentelemetry-sdk
        opentelemetry-semantic-conventions opentelemetry-proto opentelemetry-instrumentation
        opentelemetry-instrumentation-grpc opentelemetry-exporter-prometheus prometheus-client
        sortedcontainers wrapt)

fail() { echo "gpu_check: $*" >&2; exit 2; }

locked_version() { sed -n "s/^$1==\([^ ]*\).*/\1/ip" requirements.lock | head -1; }

stage() {
  grep -qxF "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >> .git/info/exclude
  rm -rf "$STAGE" && mkdir -p "$STAGE/call1" "$STAGE/call2/wheels"
  local specs=() name version
  for name in "${WHEELS[@]}"; do
    version=$(locked_version "$name")
    [ -n "$version" ] || fail "stage: $name is not in requirements.lock"
    specs+=("$name==$version")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$STAGE/call2/wheels" "${specs[@]}"
  local gguf
  gguf=$(ls data/cache/gguf/*.gguf 2>/dev/null | head -1)
  [ -n "$gguf" ] || fail "stage: no GGUF under data/cache/gguf (run make model first)"
  [ -f data/workload/prompts.jsonl ] || fail "stage: no workload under data/workload (run make model first)"
  split -b "$PART_BYTES" "$gguf" "$STAGE/model.part-"
  mv "$STAGE/model.part-aa" "$STAGE/call1/" && mv "$STAGE"/model.part-* "$STAGE/call2/"
  tar -C data -cJf "$STAGE/call1/workload.tar.xz" workload
  local manifest
  manifest="gguf=$(basename "$gguf")"$'\n'"sha256=$(sha256sum "$gguf" | cut -d' ' -f1)"
  echo "$manifest" > "$STAGE/call1/manifest" && echo "$manifest" > "$STAGE/call2/manifest"
  du -sh "$STAGE"/call1 "$STAGE"/call2
}

receive() {
  mkdir -p "$KEEP"
  local call
  for call in "$STAGE"/call*; do
    [ -d "$call" ] && cp -r "$call"/. "$KEEP"/
  done
  echo "gpu_check: kept $(ls "$KEEP" | tr '\n' ' ')"
}

preflight() {
  command -v nvidia-smi > /dev/null || fail "no nvidia-smi: this is not a GPU machine; nothing was checked"
  python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || fail "torch sees no CUDA device: nothing was checked"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

install_and_convert() {
  if [ -d "$KEEP/wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$KEEP"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
  else
    export PYTHONPATH="$PWD"
  fi
  rm -rf adaccel && mkdir -p adaccel/v1
  python3 -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/adaccel/v1/*.proto
  touch adaccel/__init__.py adaccel/v1/__init__.py
  DATA=${ADACCEL_DATA_DIR:-/tmp/adaccel-data}
  MODEL=${ADACCEL_MODEL_PATH:-$DATA/models/smollm2-135m-instruct}
  if [ ! -f "$MODEL/config.json" ]; then
    [ -f "$KEEP/manifest" ] || fail "no model: set ADACCEL_MODEL_PATH or carry the staged parts (bench/gpu_check.sh stage)"
    local gguf sha256
    gguf=$(sed -n 's/^gguf=//p' "$KEEP/manifest"); sha256=$(sed -n 's/^sha256=//p' "$KEEP/manifest")
    mkdir -p "$DATA/cache/gguf"
    cat "$KEEP"/model.part-* > "$DATA/cache/gguf/$gguf" || fail "model parts missing under $KEEP"
    echo "$sha256  $DATA/cache/gguf/$gguf" | sha256sum -c --quiet - \
      || fail "model parts incomplete under $KEEP: carry both calls' parts"
    # The GGUF in the cache is what `make model` would fetch: the conversion takes it from there.
    python3 -m common.modeling.default_model --data-dir "$DATA"
  fi
  if [ ! -f "$DATA/workload/prompts.jsonl" ]; then
    [ -f "$KEEP/workload.tar.xz" ] || fail "no workload under $DATA/workload and none carried"
    tar -C "$DATA" -xJf "$KEEP/workload.tar.xz"
  fi
}

run_checks() {
  local out=${OUT:-/tmp/adaccel-gpu-out} t0=$SECONDS
  mkdir -p "$out" /tmp/gpu-results
  export PYTHONUNBUFFERED=1 TEST_TORCH_DEVICE=cuda
  echo "== lossless property test on CUDA"
  python3 -m pytest -q -p no:cacheprovider tests/unit/engine/test_engine_greedy.py 2>&1 | tee "$out/lossless-cuda.log" | tail -3
  echo "== Triton kernels (fp32, fp16, bf16) and assembly on the kernels"
  python3 -m pytest -q -p no:cacheprovider tests/unit/kernels 2>&1 | tee "$out/kernels-cuda.log" | tail -3
  echo "== bench-projection"
  python3 -m bench.projection --device cuda --dtype bfloat16 --results-dir /tmp/gpu-results
  echo "== bench-decode (bf16)"
  python3 -m bench.decode --data-dir "$DATA" --model-path "$MODEL" --device cuda --dtype bfloat16 --tasks item_knowledge \
    --prompts 6 --max-new-tokens 64 --repeats 1 --served-per-segment 2 --no-sweep --batch-sizes 4 \
    --results-dir /tmp/gpu-results
  echo "== bench-prefill (bf16)"
  python3 -m bench.prefill --data-dir "$DATA" --model-path "$MODEL" --device cuda --dtype bfloat16 --sizes 1024 2048 \
    --prompts 2 --repeats 1 --results-dir /tmp/gpu-results
  for f in /tmp/gpu-results/*.json; do
    local name
    name=$(basename "$f" .json)-cuda.json
    cp "$f" "$RESULTS/$name"
    cp "$f" "$out/$name"
  done
  echo "gpu_check: done in $((SECONDS - t0)) s; results: $(ls "$out" | tr '\n' ' ')"
}

case "${1:-}" in
  stage) stage ;;
  receive) receive ;;
  run) preflight; receive; install_and_convert; run_checks ;;
  *) echo "usage: bench/gpu_check.sh stage | receive | run" >&2; exit 64 ;;
esac
