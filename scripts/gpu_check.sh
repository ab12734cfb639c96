#!/usr/bin/env bash
# The one command that proves the GPU path. Run it from anywhere on a CUDA machine:
#
#   bash scripts/gpu_check.sh                   # logs and JSON under $OUT (default /tmp/gpu_check)
#
# 1. pytest --device cuda over tests/engine, file by file, the GPU-only ones first: the
#    decode CUDA graphs captured and replayed == eager token for token (fp32) and schema-
#    constrained decoding on the engine's device (test_cuda_graph.py), the mixture-of-experts
#    family in bfloat16 (grouped_mm's dtype on CUDA) as graphs against eager (test_qwen3.py),
#    the Triton decode kernel vs the reference in bf16/fp16 at Qwen2-VL-2B (12:2) and -7B
#    (28:4) shapes, the engine started on --device auto/cuda/cuda:0, the loader on CUDA (bf16,
#    bitsandbytes when installed), the paged engine vs HF generate; then the rest. Every
#    engine test runs with and without async scheduling (step t+1 queued before step t's
#    tokens are read). Then the --compile-decoder tests (compiled == eager fused, token for
#    token), on their own clock. The CPU-only tests (Triton's interpreter, FakeTensorMode's
#    fake CUDA) are left to CI.
# 2. scripts/bench_gpu.py: decode tokens/s of full-size random-weight 2B and 7B (BENCH_SIZES:
#    also 30b-a3b, Qwen3-VL's mixture of experts) at batch 1/8/32/64 against the HBM
#    roofline (reference and Triton attention eager, Triton as CUDA graphs too, with graph
#    tokens == eager tokens per row), the 2B engine loop with and without async scheduling (ms per decode step, same tokens), the memory profile's
#    budget against a real run's peak, the capacity and chunked-prefill benchmarks, and last
#    the compiled fused decoder (--compile-decoder) as graphs at batch 1 and 32. One table,
#    printed also when the time limit stops it.
#
# A machine without this server's Python packages (and no network) gets them as wheels in
# .whl/ (scripts/fetch_gpu_wheels.sh makes them), installed into /tmp/site first.
# Budget (the device tool allows 10 minutes a call): the three clocks below, 180 + 80 + 220 s
# with 10 s of grace each (8.5 minutes), and the wheels' install and the versions' line before
# them (about 40 s): room left under the call's limit, so the table always comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# (xgrammar's tvm-ffi would otherwise build a C++ extension for torch at first import)
export TVM_FFI_DISABLE_TORCH_C_DLPACK=1
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, triton; print('torch', torch.__version__, \
'| transformers', transformers.__version__, '| triton', triton.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

status=0
# float32 for the token-for-token comparisons with HF generate (bf16 rounds differently with
# the batch shape); the bf16 paths are the kernel tests' and the benchmark's.
# SIGINT, not SIGTERM, at the time limit: pytest then still prints its failures and writes the
# XML. A file that fails to import (another torch here) costs its own tests, not every file's.
per_test=()
if $PY -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout 90); fi
# Files named one by one (no directory beside them: pytest 8.0-8.4 then collects only the
# files named twice), in this order, so a time limit costs the device-agnostic ones last.
engine_files=()
for name in cuda_graph qwen3 attention engine loader batching decoder paged prompt_logprobs \
  engine_loop sampler scheduler detokenizer tiny traffic; do engine_files+=("tests/engine/test_$name.py"); done
for file in tests/engine/test_*.py; do  # a new file must be placed in the order above
  [[ " ${engine_files[*]} tests/engine/test_host_device.py " == *" $file "* ]] \
    || echo "gpu_check: $file is not in its list of engine test files: not run" >&2
done
# Each part on its own clock (a time limit is its own result: TIMED-OUT, not a failed test),
# the clocks and their 10 s grace adding up to under the device call's 600 s with the install.
engine=PASSED compiled=PASSED bench=PASSED
outcome() {  # a part's exit status, the seconds it ran, its clock
  if [ "$1" = 0 ]; then echo PASSED
  # 124: timeout's own; 137 (killed) only once the clock is up: else it is the OOM killer's
  elif [ "$1" = 124 ] || { [ "$1" = 137 ] && [ "$2" -ge "$3" ]; }; then echo TIMED-OUT
  else echo FAILED; fi
}
start=$SECONDS
timeout -s INT -k 10 180 $PY -m pytest -q -rfE --durations=15 -p no:cacheprovider \
  --continue-on-collection-errors --device cuda --dtype float32 "${per_test[@]}" \
  -k "not interpreted and not compiled and not fake_cuda" \
  "${engine_files[@]}" --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
engine=$(outcome "$rc" $((SECONDS - start)) 180)
start=$SECONDS
# (not the async-scheduling copies: the same decoder compiled again, more than this clock holds)
timeout -s INT -k 10 80 $PY -m pytest -q -rfE --durations=5 -p no:cacheprovider \
  --continue-on-collection-errors --device cuda --dtype float32 \
  -k "compiled and not interpreted and not async" tests/engine/test_decoder.py \
  --junitxml="$OUT/pytest_compile.xml" 2>&1 | tee "$OUT/pytest_compile.log"
rc=${PIPESTATUS[0]}
compiled=$(outcome "$rc" $((SECONDS - start)) 80)
# BENCH_SIZES=30b-a3b benchmarks Qwen3-VL-30B-A3B (a mixture of experts) instead.
read -ra sizes <<< "${BENCH_SIZES:-2b 7b}"
start=$SECONDS
timeout -s INT -k 10 220 $PY scripts/bench_gpu.py --device cuda --sizes "${sizes[@]}" \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
bench=$(outcome "$rc" $((SECONDS - start)) 220)
[ "$engine$compiled$bench" = PASSEDPASSEDPASSED ] || status=1
echo "gpu_check: $([ "$status" = 0 ] && echo PASSED || echo FAILED) (engine tests $engine," \
  "--compile-decoder tests $compiled, benchmark $bench; logs in $OUT)"
exit "$status"
