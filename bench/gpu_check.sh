#!/usr/bin/env bash
# The GPU check: gradients at the presets' precision, and the sd15 sampler and learner benchmarks, on one GPU;
# one JSON line each, into $OUT.
#
#   device tool:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)   (about 8-9 minutes)
#   here (CPU):   OUT=/tmp/gpu-check PYTHON=.venv/bin/python bash bench/gpu_check.sh --preset tiny
#
# The device image has torch, transformers, peft and PyYAML but not diffusers or pydantic: carry them as wheels,
# fetched once here into .whl/ (ignored by git), as /work/.library/device/README.md describes:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection importlib_metadata
# Then copy $OUT/*.json with the card's name ($OUT/gpu.txt) into bench/RESULTS.md.
set -uo pipefail
PRESET=sd15
if [ "${1:-}" = "--preset" ]; then PRESET=${2:?--preset needs tiny or sd15}; fi
OUT=${OUT:-$PWD/gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import diffusers, pydantic" 2>/dev/null; then  # the device image: install the carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "diffusers/pydantic missing and .whl/ did not install (see the pip download line above)"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") >"$OUT/gpu.txt" 2>&1

bench() {  # bench NAME SECONDS FLAGS...: $OUT/NAME.json (the JSON line) and $OUT/NAME.log (stderr)
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$PY" -m bench "$name" --preset "$PRESET" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  echo "$name: exit $? $(cat "$OUT/$name.json")"
}

# the LoRA gradient of float16 (loss-scaled and not) and bfloat16 bases vs float32, SD 1.5 shapes and divisor
bench precision 180
if [ "$PRESET" = sd15 ]; then
  # 8 images x 50 steps, CFG: fp16 eager vs bf16 + autocast + compile + channels-last (the default fast path)
  bench sampler 240 --rounds 3
  # 4 samples x 50 timesteps, micro-batch 2: fp16 eager vs the fast path with fused AdamW
  bench learner 300 --samples 4 --rounds 2
else
  bench sampler 120 --batch 2 --steps 2 --rounds 1 --iters 1 --warmup 1 --fast channels_last=true
  bench learner 120 --samples 2 --micro-batch 2 --steps 2 --rounds 1 --fast channels_last=true
fi
