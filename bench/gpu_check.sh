#!/usr/bin/env bash
# Everything this repo checks on a lent GPU, in one call (a lease is short: one start, one script, capped sections).
#
#   bash bench/gpu_check.sh OUT_DIR [SECTION ...]     sections: tests train demo rollout logprob mfu sync vllm
#                                                     (default: tests rollout: ~6 min measured, its caps sum
#                                                     to ~9.25 min, inside a lease's 10-minute command limit)
# setup   card, versions; installs the package (editable, no deps) and any wheels carried in .whl/ (rouge-score and
#         nltk, which minitagpr.rewards imports: train, demo and some tests need them; absent from the device image;
#         made here with `pip download --no-deps -d .whl
#         nltk rouge-score==0.1.2` then `pip wheel --no-deps -w .whl .whl/rouge_score-0.1.2.tar.gz`), ~15 s
# tests   tests/test_gpu.py and the Triton kernel tests, compiled for the card, ~55 s
# demo    the demo's RL stages + evaluation on 1 GPU rank, in parallel with the tests; carry runs/demo/{world,sft/hf,
#         sft/stage.json,prmu/hf,prmu/stage.json,base_demo} from a CPU run so SFT and PRMU are reused (their stamps
#         say what built them: an export without its stage.json is refused) but not the RL stages (guided 51 s,
#         exploratory 12 s on an H100; the evaluation did not finish inside 180 s on 2026-11-26, before CUDA-graph
#         decoding became the default)
# train   SFT (40 steps) and PRMU (20 steps) on 1 GPU rank with bf16 FSDP, from the carried demo world and SFT export
#         (as for demo): the training recipes' CUDA path, ~70 s on an H100 (2026-11-27)
# rollout bench/rollout.py, engines transformers, ours (dynamic decode) and ours-graph (CUDA-graph decode): demo
#         model batch16 + rl-demo (batch16 alone took ~110 s), then Qwen3-0.6B batch16 (~180 s, much of it making
#         and loading the 2.4 GB random checkpoint, once per engine for the peak-memory column)
# logprob bench/logprob.py at N in {4096, 8192} x H in {1024, 2048}, ~25 s
# mfu     bench/model_throughput.py on the whole Qwen3-0.6B shape, ~70 s
# sync    bench/sync_weights.py on 1 GPU rank (NCCL), demo and qwen3-0.6b-2layer presets (not yet run on a GPU)
# vllm    only where vLLM is installed (not in the device image so far): recipes/evaluate.py engine=vllm as a plain
#         process on the carried demo SFT export and base model (4 questions per task): the launcher variables and
#         two engines in one process at the default 0.3 memory share (vllm-project/vllm#21073); not yet run
# Each section has its own time cap, so one hang cannot starve the rest; logs land in OUT_DIR (at most 6 files).
# Measured 2026-11-26 and 2026-11-27 on an NVIDIA H100 80GB HBM3; the numbers are in bench/RESULTS.md.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [tests train demo rollout logprob mfu sync vllm]}
shift
sections=" ${*:-tests rollout} "
want() { [[ $sections == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
repo=$(pwd)
t0=$(date +%s)
section() { echo "=== [$(($(date +%s) - t0)) s] $*"; }

section setup
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && echo "wheels: $(ls .whl)"
  fi
} >"$out/setup.log" 2>&1
export PYTHONPATH=/tmp/site
# before the editable install below, which would re-point a CPU box's environment at this checkout
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  cat "$out/setup.log"; echo "no CUDA device visible to torch here: this script is for a GPU machine"; exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$out/setup.log" 2>&1 \
  && echo "minitagpr installed (editable)" >>"$out/setup.log"
if ! python3 -c "import minitagpr.kernels" 2>/dev/null; then  # no editable install: a copy laid out as installed
  mkdir -p /tmp/src && cp -r minitagpr /tmp/src/ && cp -r kernels /tmp/src/minitagpr/kernels
  export PYTHONPATH=/tmp/src:/tmp/site && echo "editable install failed: using the copy in /tmp/src" >>"$out/setup.log"
fi
python3 - >>"$out/setup.log" 2>&1 <<'EOF'
import torch, triton, transformers, minitagpr.kernels
print("torch", torch.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__,
      "|", torch.cuda.get_device_name(), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
EOF
cat "$out/setup.log"

demo=
if want demo; then
  section "demo RL stages on 1 GPU rank (background)"
  (
    cd "$repo" && timeout 240 torchrun --nproc_per_node=1 recipes/guided_rl.py workdir=runs/demo >"$out/demo.log" 2>&1
    echo "demo exit $? after $(($(date +%s) - t0)) s since start" >>"$out/demo.log"
  ) &
  demo=$!
fi
if want tests; then
  section "GPU tests"
  timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
    tests/test_kernels_weighted.py tests/test_kernels_compile.py >"$out/pytest.log" 2>&1
  echo "pytest exit $?" >>"$out/pytest.log"
  grep -E "vs float64|passed|failed|error|pytest exit" "$out/pytest.log" | tail -12
fi
if want train; then
  section "SFT and PRMU on 1 GPU rank"
  timeout 120 torchrun --nproc_per_node=1 recipes/sft.py demo_dir=runs/demo out_dir=/tmp/gpu_sft max_steps=40 \
    >"$out/train.log" 2>&1
  echo "sft exit $?" >>"$out/train.log"
  timeout 120 torchrun --nproc_per_node=1 recipes/train_prmu.py --config recipes/configs/prmu_demo.yaml \
    demo_world=runs/demo/world init=runs/demo/sft/hf new_head=true max_steps=20 out_dir=/tmp/gpu_prmu \
    >>"$out/train.log" 2>&1
  echo "train_prmu exit $?" >>"$out/train.log"
  grep -E "exit|error|Error|exported|step (1|20|40)/" "$out/train.log" | tail -12
fi
if [ -n "$demo" ]; then
  section "waiting for the demo"
  wait $demo
  grep -vE "^\[(sft|prmu|guided|exploratory)[^]]*\] step|^(guided|exploratory|prmu) step" "$out/demo.log" | tail -40
fi

cd bench
if want rollout; then
  section "rollout: demo model"
  timeout 180 python3 rollout.py --device cuda --dtype bfloat16 --workloads batch16,rl-demo --runs 3 \
    >"$out/rollout.log" 2>&1
  section "rollout: Qwen3-0.6B"
  timeout 240 python3 rollout.py --device cuda --dtype bfloat16 --preset qwen3-0.6b --workloads batch16 --runs 3 \
    >>"$out/rollout.log" 2>&1
  grep -v "Loading weights" "$out/rollout.log"
fi
if want logprob; then
  section "logprob"
  timeout 90 python3 logprob.py --n 4096 8192 --repeats 5 --warmup 2 >"$out/logprob.log" 2>&1
  grep -v "^#" "$out/logprob.log" | tail -14
fi
if want mfu; then
  section "model throughput + MFU"
  timeout 120 python3 model_throughput.py --device cuda --dtype bfloat16 --shapes qwen3-0.6b \
    --rounds 1 --steps 10 --warmup 3 --threads 8 >"$out/mfu.log" 2>&1
  cat "$out/mfu.log"
fi
if want sync; then
  section "weight sync"
  for preset in demo qwen3-0.6b-2layer; do
    timeout 120 torchrun --nproc_per_node=1 sync_weights.py --preset $preset --rounds 7 >>"$out/sync.log" 2>&1
    echo "sync_weights $preset exit $?" >>"$out/sync.log"
  done
  grep -vE "^W[0-9]" "$out/sync.log" | tail -16
fi
if want vllm; then
  section "vLLM evaluation as a plain process"
  cd "$repo"
  if python3 -c "import vllm" 2>/dev/null; then
    timeout 300 python3 recipes/evaluate.py --config recipes/configs/eval_demo.yaml engine=vllm limit=4 \
      checkpoints=base=runs/demo/base_demo,sft=runs/demo/sft/hf out_dir=/tmp/gpu_eval_vllm >"$out/vllm.log" 2>&1
    echo "evaluate engine=vllm exit $?" >>"$out/vllm.log"
    tail -20 "$out/vllm.log"
  else
    echo "vllm is not installed here: skipped"
  fi
  cd bench
fi
section done
