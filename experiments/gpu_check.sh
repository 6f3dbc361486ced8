#!/usr/bin/env bash
# The GPU checks on one CUDA GPU, in two commands (each step's wall time is in the summary):
#
#     bash experiments/gpu_check.sh bench [OUT]       # about 3 to 4 min on an H100
#     bash experiments/gpu_check.sh pipeline [OUT]    # about 4.5 min; under 4 straight after bench on one machine
#
# On a lent GPU machine that runs one command at a time from the repository's root, one call each; what must
# travel is the working tree as it is, nothing more (the pipeline makes its own data, and the GPU tests run on
# random codes where Fashion-MNIST is missing); most of each command is compiling DiT-XL/2 (about 1.5 min a graph):
#
#     run(command="bash experiments/gpu_check.sh bench", timeout_s=360)
#     run(command="bash experiments/gpu_check.sh pipeline", timeout_s=420)
#
# bench: the DiT-XL/2 training step at batch 32 in bf16 (ImageNet-256's 32 x 32 grid, K = 16384), eager and
#    compiled, the compiled step with and without its loss in the graph: experiments/bench.py (steps/s, images/s,
#    MFU, peak memory).
# pipeline: the tier-3 pipeline of the README on random data: random JPEGs and random LlamaGen VQ-8 weights
#    (experiments/random_imagenet.py), `tokenizer.py encode`, `train.py --model DiT-XL/2 --compile` for 10 steps,
#    `--resume` to 20 (that a compiled run resumes, and its rate after recompiling); sampling that DiT-XL/2 (random
#    weights: the images mean nothing) with 250 Euler steps and guidance 1.5 (images/s, peak memory), and its
#    network passes at sample.py's default batch (the peak); python -m pytest tests/test_gpu.py, alongside the
#    steps up to train.
#
# Each command first checks all it needs, in seconds: a python with torch (python, else python3; PYTHON names
# another) and the packages the steps import, CUDA, free disk under /tmp, a new summary in OUT; it names whatever
# is missing in one line and exits 2. Its files: OUT/gpu-check-CMD.md, the summary (the numbers and the exact
# commands, written as it goes), and OUT/gpu-check-CMD-logs.tar.gz, each step's output (after every step). OUT is the
# second argument, else $OUT, else /tmp/gpu-check. The work (data, checkpoints, samples) lies in a new folder
# under /tmp, deleted at the end unless KEEP_WORK=1. The first step that fails stops the command with its exit
# status.

set -uo pipefail
cd "$(dirname "$0")/.."

CMD=${1:-}
case "$CMD" in
  bench) NEED_GIB=4 ;;      # the compile caches (/tmp/torchinductor_$USER)
  pipeline) NEED_GIB=32 ;;  # DiT-XL/2's last.pt (11.2 GiB: weights, EMA, AdamW's two moments) beside the one being
                            # written; two EMA-only files (2.8 GiB each); the data, the caches, the tests' runs
  *)
    echo "error: usage: bash experiments/gpu_check.sh {bench|pipeline} [OUT]${CMD:+ (got '$CMD')}" >&2
    exit 2 ;;
esac
if [ $# -gt 2 ]; then
  echo "error: usage: bash experiments/gpu_check.sh {bench|pipeline} [OUT] (got $# arguments)" >&2
  exit 2
fi
OUT_DIR="${2:-${OUT:-/tmp/gpu-check}}"
SUMMARY="$OUT_DIR/gpu-check-$CMD.md"
ARCHIVE="$OUT_DIR/gpu-check-$CMD-logs.tar.gz"

# ---- What the command needs, all of it checked before anything runs ------------------------------------------

MISSING=()
PY=
for candidate in ${PYTHON:-python python3}; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null
  then
    PY=$candidate
    break
  fi
done
PACKAGES="numpy PIL tqdm"
[ "$CMD" = pipeline ] && PACKAGES="$PACKAGES pytest"
if [ -z "$PY" ]; then
  MISSING+=("a python with torch (${PYTHON:-python or python3})")
else
  while IFS= read -r line; do
    [ -n "$line" ] && MISSING+=("$line")
  done < <("$PY" - $PACKAGES <<'EOF' 2>/dev/null
import importlib.util, sys
for name in sys.argv[1:]:
    if importlib.util.find_spec(name) is None:
        print(f"the python package {name}")
try:
    import torch
except Exception as e:
    print(f"a torch that imports ({type(e).__name__}: {e})"[:200])
else:
    if not torch.cuda.is_available():
        print(f"CUDA (torch {torch.__version__} finds no GPU)")
EOF
  )
fi
FREE_GIB=$(df -Pk /tmp 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}')
if [ -z "$FREE_GIB" ] || [ "$FREE_GIB" -lt "$NEED_GIB" ]; then
  MISSING+=("$NEED_GIB GiB free under /tmp (${FREE_GIB:-unknown} GiB free)")
fi
FOLDER=$OUT_DIR  # OUT, or the folder that will hold it
while [ ! -e "$FOLDER" ]; do FOLDER=$(dirname "$FOLDER"); done
if [ -e "$SUMMARY" ]; then
  MISSING+=("a new summary ($SUMMARY exists: give an empty or new output folder)")
elif [ ! -d "$FOLDER" ] || [ ! -w "$FOLDER" ]; then
  MISSING+=("a writable output folder ($OUT_DIR)")
fi
if [ ${#MISSING[@]} -gt 0 ]; then
  MISSING=$(printf '%s, ' "${MISSING[@]}")
  echo "error: gpu_check.sh $CMD: missing ${MISSING%, }" >&2
  exit 2
fi

mkdir -p "$OUT_DIR" || exit 2
W=$(mktemp -d "/tmp/gpu-check-$CMD.XXXXXX") || exit 2  # the work; W/logs goes into the archive
mkdir -p "$W/logs"
declare -A PID START COMMAND  # of the steps in the background

archive() { tar -czf "$ARCHIVE.tmp" -C "$W" logs && mv -f "$ARCHIVE.tmp" "$ARCHIVE"; }
finish() {
  for pid in ${PID[@]+"${PID[@]}"}; do  # a background step still running: its command, then the shell that waits for it
    command -v pkill >/dev/null && pkill -P "$pid" 2>/dev/null
    kill "$pid" 2>/dev/null
  done
  archive
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work kept in $W"; else rm -rf "$W"; fi
}
trap finish EXIT

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

# record NAME START END RC COMMAND: the command (quoted, one string) and its wall time in the summary; the end of
# its log, and the script stopped with its exit status, if it failed.
record() {
  local name=$1 start=$2 end=$3 rc=$4 command=$5
  say ""
  say "### $name"
  say ""
  say '```'
  say "$command"
  say '```'
  if [ "$rc" -ne 0 ]; then
    say ""
    say "FAILED (exit status $rc) after $((end - start)) s; the end of logs/$name.log:"
    tail -n 30 "$W/logs/$name.log" | tee -a "$SUMMARY"
    exit "$rc"
  fi
  say ""
  say "wall time: $((end - start)) s"
  archive
}

# step NAME COMMAND...: run it, its output in logs/NAME.log, and record it.
step() {
  local name=$1 start=$SECONDS rc
  shift
  "$@" >"$W/logs/$name.log" 2>&1
  rc=$?
  record "$name" "$start" "$SECONDS" "$rc" "$(printf '%q ' "$@")"
}

# in_background NAME COMMAND...: start it, its output in logs/NAME.log; wait_for NAME: wait for it and record it.
in_background() {
  local name=$1
  shift
  { "$@" >"$W/logs/$name.log" 2>&1; echo "$? $SECONDS" >"$W/$name.ended"; } &
  PID[$name]=$! START[$name]=$SECONDS COMMAND[$name]=$(printf '%q ' "$@")
}
wait_for() {
  local name=$1 rc end
  wait "${PID[$name]}"
  unset "PID[$name]"
  read -r rc end <"$W/$name.ended" || { rc=1 end=$SECONDS; }
  record "$name" "${START[$name]}" "$end" "$rc" "${COMMAND[$name]}"
}

say "# GPU check: $CMD, $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""
say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
say "python: $(command -v "$PY"), $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1)"
if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT, with uncommitted changes"
else
  COMMIT="unknown (no git)"
fi
say "commit: $COMMIT"
say "free under /tmp: $FREE_GIB GiB; work: $W"

if [ "$CMD" = bench ]; then
  # The training step: DiT-XL/2, ImageNet-256 setting (32 x 32 grid, K = 16384), batch 32, bf16 autocast; eager,
  # compiled (the network alone) and compiled with its loss (train.py's --compile); 5 warm-up steps (the compile)
  # and 20 timed ones.
  step bench "$PY" experiments/bench.py --device cuda --models DiT-XL/2 --batch-size 32 --steps 20 --warmup 5 \
    --dtype bf16 --compile both --compiled-loss both --out "$W/logs/bench.md"
  say ""
  grep '^device:' "$W/logs/bench.log" | tee -a "$SUMMARY"
  say ""
  grep '^|' "$W/logs/bench.log" | tee -a "$SUMMARY"
  say ""
  say "all steps passed in $SECONDS s"
  exit 0
fi

# The GPU tests run alongside the steps up to train (tiny models: they barely share the GPU), on Fashion-MNIST's
# codes where tests/conftest.py finds its files, else on random codes (tests/test_gpu.py: random_codes).
FASHION_MNIST=$("$PY" -c 'import sys; sys.path.insert(0, "tests"); import conftest
print("random codes (no Fashion-MNIST in %s)" % conftest.FASHION_MNIST if conftest.missing_fashion_mnist()
      else "Fashion-MNIST in %s" % conftest.FASHION_MNIST)' 2>&1 | tail -n 1)
in_background pytest "$PY" -m pytest tests/test_gpu.py -v -rs -p no:cacheprovider

# The tier-3 pipeline on random data. 1000 classes of 1 random 288 x 272 JPEG: the model has ImageNet's label
# table, so its compiled step is the benchmark's (with its loss), whose kernels torch may find in its cache on a
# machine that ran bench.
step data "$PY" experiments/random_imagenet.py --out "$W" --classes 1000 --images-per-class 1
step encode "$PY" tokenizer.py encode --tokenizer llamagen-vq8 --tokenizer-ckpt "$W/vq_ds8_c2i.pt" \
  --dataset imagefolder --data-dir "$W/imgs" --image-size 256 --batch-size 64 --out "$W/codes"
TRAIN=("$PY" train.py --codes "$W/codes" --model DiT-XL/2 --objective purrception --batch-size 32 --lr 1e-4
       --compile --log-every 5 --ckpt-every 10 --sample-every 0 --out "$W/run")
# 10 compiled steps (the first one compiles), then resumed to 20 (a new process: it compiles again).
step train "${TRAIN[@]}" --steps 10
wait_for pytest
if grep -Eq '[0-9]+ skipped' "$W/logs/pytest.log"; then
  say "FAILED: tests were skipped (see logs/pytest.log)"
  exit 1
fi
say ""
say "on $FASHION_MNIST: $(tail -n 1 "$W/logs/pytest.log")"
step resume "${TRAIN[@]}" --steps 20 --resume
cp "$W/run/log.jsonl" "$W/logs/train-log.jsonl"
say ""
say "log.jsonl (images/s over the 5 steps before each line; the first line and the third hold a compile):"
sed -E 's/^\{"step": ([0-9]+), "loss": ([-0-9.e]+).*"images_per_s": ([0-9.e+]+).*/step \1: loss \2, \3 images\/s/' \
  "$W/run/log.jsonl" | tee -a "$SUMMARY"
grep -h 'process(es) on' "$W/logs/train.log" "$W/logs/resume.log" | tee -a "$SUMMARY"

# Sampling, in one Python process that reads its peak GPU memory: sample.py's own main on the EMA weights of step
# 20, 250 Euler steps, guidance 1.5 (two network rows a sample), the network under bf16 autocast (--precision
# auto). images/s is the samples over sample.py's own clock (settings.json "seconds": from the first batch to the
# last, decoding included). The peak is read when the decoder starts (the network passes) and when it ends. Then
# the network passes alone at sample.py's default batch (2 Euler steps: the peak is one pass's).
cat >"$W/logs/sample_and_measure.py" <<'EOF'
import gc, json, os, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository: the command runs from its root
import sample
from support import checkpoint, distributed, llamagen

GiB = 2**30
peak = {"network": 0, "decoder": 0}
decode = llamagen.LlamaGenVQ.decode

def measured(self, codes):
    peak["network"] = max(peak["network"], torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    images = decode(self, codes)
    peak["decoder"] = max(peak["decoder"], torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    return images

llamagen.LlamaGenVQ.decode = measured
argv = sys.argv[1:]
sample.main(argv)
s = json.load(open(os.path.join(argv[argv.index("--out") + 1], "settings.json")))
print(f"sampling: {s['num_samples']} samples, {s['steps']} {s['solver']} steps, guidance {s['cfg_scale']} "
      f"(nfe {s['nfe']}), batch {s['batch_size']}, {s['precision']}: {s['seconds']} s, "
      f"{s['num_samples'] / s['seconds']:.3g} images/s; peak GPU memory {peak['network'] / GiB:.1f} GiB in the "
      f"network passes, {peak['decoder'] / GiB:.1f} GiB decoding")

gc.collect()
flow = checkpoint.Flow(argv[argv.index("--ckpt") + 1], torch.device("cuda"))
n = sample.BATCH_SIZE
y = torch.as_tensor(sample.sample_labels(n, flow.num_classes), device=flow.device)
precision, model = distributed.autocast_model(flow.model, "auto", flow.device)
held = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
flow.objective.sample(model, (n, *flow.grid), y=y, steps=2, cfg_scale=1.5,
                      generator=torch.Generator(flow.device).manual_seed(0))
print(f"network passes at batch {n} with guidance ({2 * n} rows a pass), {precision}: peak GPU memory "
      f"{torch.cuda.max_memory_allocated() / GiB:.1f} GiB, {held / GiB:.1f} GiB of it held before (the weights)")
EOF
step sample "$PY" "$W/logs/sample_and_measure.py" --ckpt "$W/run/checkpoints/step-0000020.pt" --num-samples 32 \
  --batch-size 32 --steps 250 --solver euler --cfg-scale 1.5 --out "$W/samples"
cp "$W/samples/settings.json" "$W/logs/sample-settings.json"
say ""
grep -E '^(sampling|network passes)' "$W/logs/sample.log" | tee -a "$SUMMARY"
say ""
say "all steps passed in $SECONDS s"
