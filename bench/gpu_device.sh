#!/usr/bin/env bash
# On a lent GPU machine, in the repository root, with .device/ carried (bench/gpu_device.py
# builds it: `make gpu-bundle`): install the bundle, run the CUDA tests, then the benchmark.
# Everything it measures lands in $OUT as it goes, so a run cut short keeps what it had.
# Budget: one device call of <= 590 s (install ~30 s, tests <= 150 s, benchmark <= 380 s).
set -uo pipefail
PY=${PYTHON:-python3}                 # the image's python3 holds its CUDA torch
OUT=${OUT:-/tmp/tunelab-gpu-out}
SITE=${SITE:-/tmp/site}
BUNDLE=$(realpath "${BUNDLE:-.device}")
mkdir -p "$OUT"
test -d "$BUNDLE/wheels" || { echo "no $BUNDLE/wheels: make gpu-bundle, and carry .device"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$BUNDLE"/wheels/*.whl || exit 3
export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false TUNELAB_SMOLLM2_TOKENIZER="$BUNDLE/tokenizer"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, transformers, trl, peft, datasets, accelerate
import importlib.util as u
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())
print('transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__,
      'datasets', datasets.__version__, 'accelerate', accelerate.__version__)
for m in ('liger_kernel', 'bitsandbytes', 'flash_attn'):
    print(m, 'yes' if u.find_spec(m) else 'no')"
} 2>&1 | tee "$OUT/versions.txt"
timeout "${TESTS_SECONDS:-150}" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_attention.py \
    tests/test_train_engine.py::test_qlora_trains_on_a_4bit_base 2>&1 | tail -40 | tee "$OUT/tests.txt"
timeout "${BENCH_SECONDS:-380}" "$PY" bench/gpu.py ${BENCH_ARGS:---models llama-1b,smollm2-135m} \
    --results "$OUT/gpu-results.json" 2>&1 | tee "$OUT/bench.txt"
