#!/usr/bin/env bash
# The GPU checks, on one CUDA GPU, in one command (several minutes; each step's wall time is in the summary):
#
#     bash experiments/gpu_check.sh OUT        # OUT defaults to $OUT, else /tmp/gpu-check
#
# 1. the DiT-XL/2 training step at batch 32 in bf16, eager and compiled: experiments/bench.py (steps/s, images/s,
#    MFU, peak memory);
# 2. the tier-3 pipeline of the README on random data: random JPEGs and random LlamaGen VQ-8 weights
#    (experiments/random_imagenet.py), `tokenizer.py encode`, `train.py --model DiT-XL/2 --compile` for 30 steps,
#    `--resume` to 40 (that a compiled run resumes, and the rate after recompiling);
# 3. sampling throughput of that DiT-XL/2 (random weights, so the images mean nothing): images/s at 250 Euler
#    steps with guidance 1.5, and the peak GPU memory, from `sample.py` run in-process;
# 4. python -m pytest tests/test_gpu.py (compiled bf16 training, resume of a compiled run, bf16 sampling).
#
# OUT/summary.md gets the numbers and the exact commands, OUT/logs/ each command's output, OUT/bench.md the
# benchmark's table. The first step that fails stops the script with its exit status. The large files (the
# checkpoints, the random tokenizer, samples.npz) are deleted at the end, unless KEEP_WORK=1.
# The pytest step needs Fashion-MNIST (tests/conftest.py: /usr/share/datasets/fashion-mnist or
# $PURRCEPTION_FASHION_MNIST); here a missing dataset, or any skipped test, is a failure, not a skip.

set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${1:-${OUT:-/tmp/gpu-check}}"
W="$OUT_DIR/work"                       # the random data, the code set, the run, the samples
NUM_SAMPLES="${NUM_SAMPLES:-64}"        # step 3: two batches of 32 (64 rows per network pass with guidance)
SAMPLE_BATCH="${SAMPLE_BATCH:-32}"
SUMMARY="$OUT_DIR/summary.md"

if [ -e "$SUMMARY" ]; then
  echo "error: $SUMMARY exists: give an empty or new output folder" >&2
  exit 2
fi
mkdir -p "$OUT_DIR/logs" || exit 2

cleanup() {
  if [ "${KEEP_WORK:-0}" != 1 ]; then
    rm -f "$W"/run/checkpoints/*.pt "$W"/vq_ds8_c2i.pt "$W"/samples/samples.npz
  fi
}
trap cleanup EXIT

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

# step NAME COMMAND...: run it with its output in logs/NAME.log; record the command and its wall time in the
# summary; stop the script with its exit status if it fails.
step() {
  local name=$1 start=$SECONDS rc
  shift
  local log="$OUT_DIR/logs/$name.log"
  say ""
  say "### $name"
  say ""
  say '```'
  say "$(printf '%q ' "$@")"
  say '```'
  "$@" >"$log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    say ""
    say "FAILED (exit status $rc) after $((SECONDS - start)) s; the end of $log:"
    tail -n 30 "$log" | tee -a "$SUMMARY"
    exit $rc
  fi
  say ""
  say "wall time: $((SECONDS - start)) s"
}

say "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""
say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null) || COMMIT="unknown (no git)"
git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT, with uncommitted changes"
say "commit: $COMMIT"
say "output: $OUT_DIR"

# 1. The training step: DiT-XL/2, ImageNet-256 setting (32 x 32 grid, K = 16384), batch 32, bf16 autocast, eager
#    and torch.compile'd; 5 warm-up steps (the compile) and 20 timed ones. bench.py fails if CUDA is not there.
step bench python experiments/bench.py --device cuda --models DiT-XL/2 --batch-size 32 --steps 20 --warmup 5 \
  --dtype bf16 --compile both --out "$OUT_DIR/bench.md"
say ""
grep '^device:' "$OUT_DIR/logs/bench.log" | tee -a "$SUMMARY"
say ""
grep '^|' "$OUT_DIR/logs/bench.log" | tee -a "$SUMMARY"

# 2. The tier-3 pipeline on random data. 1000 classes of 1 random 288 x 272 JPEG: the model has ImageNet's label
#    table, the same graph as the benchmark's (whose compiled kernels torch may then find in its cache).
step data python experiments/random_imagenet.py --out "$W" --classes 1000 --images-per-class 1
step encode python tokenizer.py encode --tokenizer llamagen-vq8 --tokenizer-ckpt "$W/vq_ds8_c2i.pt" \
  --dataset imagefolder --data-dir "$W/imgs" --image-size 256 --batch-size 64 --out "$W/codes"
TRAIN=(python train.py --codes "$W/codes" --model DiT-XL/2 --objective purrception --batch-size 32 --lr 1e-4
       --compile --log-every 5 --ckpt-every 30 --sample-every 0 --out "$W/run")
#    30 compiled steps (the first one compiles), then resumed to 40 (a new process: it compiles again).
step train "${TRAIN[@]}" --steps 30
step resume "${TRAIN[@]}" --steps 40 --resume
say ""
say "log.jsonl (images/s over the 5 steps before each line; the first line holds the compile):"
sed -E 's/^\{"step": ([0-9]+), "loss": ([-0-9.e]+).*"images_per_s": ([0-9.e+]+).*/step \1: loss \2, \3 images\/s/' \
  "$W/run/log.jsonl" | tee -a "$SUMMARY"
grep -h 'process(es) on' "$OUT_DIR/logs/train.log" "$OUT_DIR/logs/resume.log" | tee -a "$SUMMARY"

# 3. Sampling throughput and peak memory: sample.py's own main, in this Python process so that the peak GPU
#    memory of the whole command can be read after it; the EMA weights of step 40, 250 Euler steps, guidance 1.5
#    (two network rows a sample), the network under bf16 autocast (--precision auto). images/s is samples.npz's
#    count over sample.py's own clock (settings.json "seconds": the sampling, from the first batch to the last).
SAMPLE_AND_MEASURE=$(cat <<'EOF'
import json, os, sys
import torch
import sample
sample.main(sys.argv[1:])
s = json.load(open(os.path.join(sys.argv[sys.argv.index("--out") + 1], "settings.json")))
print(f"sampling: {s['num_samples']} samples, {s['steps']} {s['solver']} steps, guidance {s['cfg_scale']} "
      f"(nfe {s['nfe']}), batch {s['batch_size']}, {s['precision']}: {s['seconds']} s, "
      f"{s['num_samples'] / s['seconds']:.3g} images/s; "
      f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
EOF
)
step sample python -c "$SAMPLE_AND_MEASURE" --ckpt "$W/run/checkpoints/step-0000040.pt" \
  --num-samples "$NUM_SAMPLES" --batch-size "$SAMPLE_BATCH" --steps 250 --solver euler --cfg-scale 1.5 \
  --out "$W/samples"
say ""
grep '^sampling:' "$OUT_DIR/logs/sample.log" | tee -a "$SUMMARY"

# 4. The GPU tests. PURRCEPTION_REQUIRE_DATA=1: without Fashion-MNIST they fail rather than skip.
step pytest env PURRCEPTION_REQUIRE_DATA=1 python -m pytest tests/test_gpu.py -v -rs -p no:cacheprovider
if grep -Eq '[0-9]+ skipped' "$OUT_DIR/logs/pytest.log"; then
  say "FAILED: tests were skipped (see logs/pytest.log)"
  exit 1
fi
say ""
tail -n 1 "$OUT_DIR/logs/pytest.log" | tee -a "$SUMMARY"
say ""
say "all steps passed in $SECONDS s"
