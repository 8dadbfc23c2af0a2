# The two commands that are the contract: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.feedret-installed
PYTEST_ARGS ?=

.PHONY: install run test test-fast test-bench proto clean bench bench-search image image-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: the local CPU build. Any other spec pulls GBs of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/feedret up

# Everything but the benchmark smoke runs (test-bench), which would take the suite past 10 minutes.
test: install
	$(PY) -m pytest -m "not bench" $(PYTEST_ARGS)

# Unit tests only: no broker, no server processes.
test-fast: install
	$(PY) -m pytest -m "not e2e and not bench" $(PYTEST_ARGS)

# Every benchmark script run end to end at a tiny size, so none rots (.ci/run runs it after test).
test-bench: install
	$(PY) -m pytest -m bench $(PYTEST_ARGS)

proto: install
	$(PY) protos/generate.py

# Embedding throughput, torch vs onnxruntime (benchmarks/embed_throughput.py --help for the knobs).
BENCH_ARGS ?=
# Embedding throughput per backend, then the member service's batching of concurrent misses.
MEMBER_ARGS ?= --concurrency 1,16 --seconds 3
bench: install
	$(PY) benchmarks/embed_throughput.py $(BENCH_ARGS)
	$(PY) benchmarks/member_batching.py $(MEMBER_ARGS)

# Search through root + shards vs raw faiss, the same path with bare gRPC servers (its floor),
# then vs milvus-lite, then vs Chroma (server) and LanceDB (installs the bench extra).
# Defaults are a smoke run; the committed results' commands are in benchmarks/results/*.md, e.g.
#   make bench-search SEARCH_ARGS="--n 1000000 --queries 200 --index Flat --index IVF4096,Flat --index HNSW32"
SEARCH_ARGS ?=
FLOOR_ARGS ?=
MILVUS_ARGS ?=
PEERS_ARGS ?=
bench-search: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/search_latency.py $(SEARCH_ARGS)
	$(PY) benchmarks/grpc_floor.py $(FLOOR_ARGS)
	$(PY) benchmarks/milvus_compare.py $(MILVUS_ARGS)
	$(PY) benchmarks/peer_compare.py $(PEERS_ARGS)

# An image (IMAGE_FLAVOUR cpu or gpu), then the whole stack run from it, a container per
# role, through to a retrieval (docker/image_smoke.py; for gpu, first a check of its CUDA
# libraries). IMAGE_RUNTIME=buildah where no Docker engine runs; IMAGE_BUILD_ARGS for a
# mirror, e.g. --build-arg TORCH_INDEX_URL=...; IMAGE_SMOKE_ARGS=--device cpu to run the
# GPU image's stack on a machine without a GPU (docs/kubernetes.md).
IMAGE_FLAVOUR ?= cpu
IMAGE ?= localhost/feedret-$(IMAGE_FLAVOUR):dev
IMAGE_RUNTIME ?= docker
IMAGE_BUILD_ARGS ?=
IMAGE_SMOKE_ARGS ?=
image:
ifeq ($(IMAGE_RUNTIME),buildah)
	buildah build --isolation chroot --layers -f docker/Dockerfile.$(IMAGE_FLAVOUR) -t $(IMAGE) $(IMAGE_BUILD_ARGS) .
else
	docker build -f docker/Dockerfile.$(IMAGE_FLAVOUR) -t $(IMAGE) $(IMAGE_BUILD_ARGS) .
endif

image-check: install image
	$(PY) docker/image_smoke.py --image $(IMAGE) --runtime $(IMAGE_RUNTIME) --flavour $(IMAGE_FLAVOUR) $(IMAGE_SMOKE_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
