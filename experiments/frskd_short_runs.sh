#!/usr/bin/env bash
# FRSKD at a short budget (docs/methods/self.md, "Short runs"): baseline vs frskd with the paper's defaults
# (alpha=2, beta=100, set for 200 epochs) vs frskd with its KD/AT ramp-up (options.rampup_epochs=R), on the
# CPU-sized Fashion-MNIST protocol of docs/results.md.
#
#   experiments/frskd_short_runs.sh [OUT_DIR]
#
# Writes OUT_DIR/defaults/{results.csv,report.md} (baseline + frskd) and OUT_DIR/ramp<R>/report.md per ramp
# length R (frskd with rampup_epochs=R; the baseline runs of OUT_DIR/defaults are copied in, so every report
# has the gain column), then prints the table that picks R: mean best-epoch VALIDATION accuracy of the
# deployed network over the seeds (the test numbers are printed beside it, never used for the choice).
# compare skips finished runs and resumes interrupted ones, so the script can simply be re-run after a stop.
# The ramp compares run side by side (one worker each) when WORKERS allows.
# OPTIM (default: the protocol's optimiser settings) is replaced as a whole; OPTIM="batch_size=64" leaves the
# engine's and each method's defaults (lr 0.1, multistep, FRSKD's weight decay 1e-4): the run a new user gets.
# The second budget of docs/methods/self.md ("a new user's run", tune.md's setting):
#   OPTIM="batch_size=64" PRECISION=fp32 SUBSET=2000 EPOCHS=4 EVAL_EVERY=4 experiments/frskd_short_runs.sh runs/frskd-short-user
# For a GPU re-run at full size: SUBSET= EPOCHS=200 RAMPS="100 200" EVAL_EVERY=1 THREADS= PRECISION=bf16 ...
set -euo pipefail
OUT=${1:-runs/frskd-short}
FUSIONKD=${FUSIONKD:-.venv/bin/fusionkd}
PYTHON=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0,1,2}
WORKERS=${WORKERS:-2}          # processes side by side
THREADS=${THREADS-1}           # torch threads per process (THREADS= : compare's default)
SUBSET=${SUBSET-5000}          # stratified training subset after the validation split (SUBSET= : all)
EPOCHS=${EPOCHS:-10}
RAMPS=${RAMPS:-"$((EPOCHS / 2)) $EPOCHS"}   # ramp lengths tried: half the run and the whole run
EVAL_EVERY=${EVAL_EVERY:-2}
MODEL=${MODEL:-resnet20}
PRECISION=${PRECISION:-bf16}
OPTIM=${OPTIM-"batch_size=64 lr=0.05 schedule=cosine nesterov=true weight_decay=0.0005"}

FLAGS=(--dataset fashion-mnist --models "$MODEL" --seeds "$SEEDS")
[ -n "$THREADS" ] && FLAGS+=(--threads "$THREADS")
read -r -a COMMON <<<"$OPTIM"
COMMON+=(val_fraction=0.05 data_seed=0 eval_every="$EVAL_EVERY" eval_batch_size=1000 precision="$PRECISION"
  channels_last=true epochs="$EPOCHS")
[ -n "$SUBSET" ] && COMMON+=(subset="$SUBSET")

# 1. baseline and frskd with its defaults
"$FUSIONKD" compare --methods baseline,frskd --out "$OUT/defaults" "${FLAGS[@]}" --workers "$WORKERS" "${COMMON[@]}"

# 2. frskd with the ramp-up, one compare per length. Each adopts a copy of the finished baseline runs of
# step 1 (compare keeps finished runs after checking their settings), so its report has the gain column; a
# symbolic link would be refused (run folders must lie inside --out).
ramp() {  # ramp R WORKERS
  mkdir -p "$OUT/ramp$1/runs/$MODEL"
  [ -e "$OUT/ramp$1/runs/$MODEL/baseline" ] || cp -r "$OUT/defaults/runs/$MODEL/baseline" "$OUT/ramp$1/runs/$MODEL/"
  # --method-options last: argparse takes the trailing key=value options in one block
  "$FUSIONKD" compare --methods baseline,frskd --out "$OUT/ramp$1" "${FLAGS[@]}" --workers "$2" "${COMMON[@]}" \
    --method-options frskd:rampup_epochs="$1"
}
read -r -a LENGTHS <<<"$RAMPS"
if [ "$WORKERS" -ge "${#LENGTHS[@]}" ]; then
  pids=()
  for R in "${LENGTHS[@]}"; do ramp "$R" 1 >"$OUT/ramp$R.log" 2>&1 & pids+=($!); done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || { tail "$OUT/ramp${LENGTHS[$i]}.log"; exit 1; }; done
else
  for R in "${LENGTHS[@]}"; do ramp "$R" "$WORKERS"; done
fi

# 3. the choice of R, on validation only
"$PYTHON" - "$OUT" "$MODEL" <<'PY'
import glob, json, statistics, sys
out, model = sys.argv[1:]
def arm(folder, method):
    runs = [json.load(open(p)) for p in sorted(glob.glob(f"{folder}/runs/{model}/{method}/s*/summary.json"))]
    pick = lambda key, split: [r[key][split]["net"] for r in runs]
    return runs, pick("best", "val"), pick("best", "test"), pick("last", "test")
def fmt(v):
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
rows = [("baseline", f"{out}/defaults", "baseline"), ("frskd defaults", f"{out}/defaults", "frskd")]
rows += [(f"frskd rampup_epochs={f.rstrip('/').split('ramp')[-1]}", f, "frskd")
         for f in sorted(glob.glob(f"{out}/ramp*/"), key=lambda f: float(f.rstrip("/").split("ramp")[-1]))]
print("arm | seeds | val % at best-val epoch | test % at best-val epoch | test % last")
best = None
for name, folder, method in rows:
    runs, val, test_best, test_last = arm(folder.rstrip("/"), method)
    if not runs:
        continue
    print(f"{name} | {len(runs)} | {fmt(val)} | {fmt(test_best)} | {fmt(test_last)}")
    if "rampup" in name and (best is None or statistics.mean(val) > best[1]):
        best = (name, statistics.mean(val))
if best:
    print(f"chosen on validation: {best[0]} (mean val {best[1]:.2f} %)")
PY
