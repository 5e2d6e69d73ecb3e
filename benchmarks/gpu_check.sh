#!/usr/bin/env bash
# The GPU throughput check of ViT-B/16 (224, bf16) as one prepared run, for a machine with
# one or more GPUs and JAX, Flax, Optax and Orbax installed. It times the training step with
# the matching gap and InfoNCE side by side (benchmarks/train_throughput.py) for:
#
#   b256_xla      2 global views, batch 256, XLA attention (the figure recorded so far)
#   b256_cudnn    the same with cuDNN flash attention (--config.model.attention=cudnn)
#   b128_mc_xla   the paper's multi-crop (2 x 224 + 10 x 96), batch 128, XLA attention
#   b128_mc_cudnn the same with cuDNN flash attention
#   eval          evaluation throughput (benchmarks/eval_throughput.py, batch 1024): feature
#                 extraction, the forward pass alone and the augmented probe's step, with
#                 the ImageNet evaluation cost they project (experiments/recipes.md)
#   trainer       the real command (python -m matching_gap.main, configs/vitb16.py, batch 128)
#                 for 60 steps on a folder of 1,024 generated JPEGs, the views cut on the host
#                 as on ImageNet: its progress rows (MFU, input wait), the line that compares
#                 the settled step with the plan, and the goodput table
#
# and prints one table per variant; $OUT (default benchmarks/results/gpu_check) gets each
# variant's whole log (<variant>.log) and environment.txt. A variant that fails or runs past $VARIANT_TIMEOUT seconds is reported and
# the script goes on. Usage, from the repository root:
#
#   bash benchmarks/gpu_check.sh                  # all variants
#   bash benchmarks/gpu_check.sh b256_cudnn       # some of them
#
# With the `device` tool (no network there; ott-jax, jaxopt, ml-collections and clu (the
# metric writers, imported by the trainer) travel as wheels in .whl/, see ../shared/ENV.md;
# `pip download --no-deps -d .whl ott-jax jaxopt ml-collections clu` makes them):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh
set -uo pipefail

out=${OUT:-benchmarks/results/gpu_check}
config=${CONFIG:-configs/vitb16.py}
timeout_s=${VARIANT_TIMEOUT:-170}

declare -A flags=(
  [b256_xla]="--config.augment.num_local_crops=0 --config.optim.batch_size=256"
  [b256_cudnn]="--config.augment.num_local_crops=0 --config.optim.batch_size=256 --config.model.attention=cudnn"
  [b128_mc_xla]="--config.optim.batch_size=128"
  [b128_mc_cudnn]="--config.optim.batch_size=128 --config.model.attention=cudnn"
)
known=(b256_xla b256_cudnn b128_mc_xla b128_mc_cudnn eval trainer)
order=("${known[@]}")
if (($#)); then order=("$@"); fi

for name in "${order[@]}"; do
  if [[ $name != eval && $name != trainer && -z "${flags[$name]+set}" ]]; then
    echo "unknown variant $name; known: ${known[*]}" >&2
    exit 2
  fi
done

mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import jax, flax, optax, ott; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'ott', ott.__version__, jax.devices())"
} 2>&1 | tee "$out/environment.txt"

for name in "${order[@]}"; do
  echo
  if [[ $name == eval ]]; then
    echo "== eval: $config --batch=1024"
    timeout "$timeout_s" python3 benchmarks/eval_throughput.py --config="$config" \
      --batch=1024 --rounds=3 --batches_per_round=4 >"$out/$name.log" 2>&1
  elif [[ $name == trainer ]]; then
    echo "== trainer: $config, batch 128, 60 steps on generated JPEGs"
    python3 - "$out/images" <<'PY'
import os, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(1024):
    folder = os.path.join(sys.argv[1], "train", f"class_{i % 8}")
    os.makedirs(folder, exist_ok=True)
    pixels = rng.integers(0, 256, (rng.integers(300, 500), rng.integers(300, 500), 3))
    Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
PY
    rm -rf "$out/trainer_run"
    timeout "$((timeout_s * 2))" python3 -m matching_gap.main --config="$config" \
      --workdir="$out/trainer_run" --config.data.source=image_folder \
      --config.data.data_dir="$out/images" --config.optim.batch_size=128 \
      --config.train.run_steps=60 --config.train.log_every=10 \
      --config.train.checkpoint_every=1000 --config.train.final_eval=False \
      --config.train.knn_every=0 --config.train.pictures=False >"$out/$name.log" 2>&1
  else
    echo "== $name: $config ${flags[$name]}"
    # shellcheck disable=SC2086  # the flags are meant to split into words
    timeout "$timeout_s" python3 benchmarks/train_throughput.py --config="$config" \
      ${flags[$name]} --rounds=3 --steps_per_round=5 >"$out/$name.log" 2>&1
  fi
  status=$?
  # The tables and the summary lines; the end of the log when the run failed.
  if ((status == 0)); then
    grep -E '^(model FLOPs|device:|\||XLA cost|view-making|ImageNet)|(step [0-9]+/|Settled|Input-bound|collapsed|Goodput)|^  [a-z]' "$out/$name.log"
  else
    echo "FAILED (exit $status$( ((status == 124)) && echo ", over ${timeout_s} s")):"
    tail -n 15 "$out/$name.log"
  fi
done
