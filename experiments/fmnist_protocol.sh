#!/usr/bin/env bash
# The CPU-sized Fashion-MNIST protocol of docs/results.md, shared by every family so that rows compare.
#
#   experiments/fmnist_protocol.sh online|self|offline [OUT_DIR]
#
# Every run is a plain `fusionkd train` run folder under OUT_DIR/<family>/; finished runs are skipped and
# interrupted ones resumed, so the script can be re-run after a stop. Aggregate with
# `fusionkd report OUT_DIR/<family> --out OUT_DIR/<family>-report`.
# For a GPU re-run at full size: SUBSET= EPOCHS=200 EVAL_EVERY=1 WORKERS=1 THREADS= PRECISION=bf16 ...
set -euo pipefail
FAMILY=${1:?family: online, self or offline}
OUT=${2:-runs/results}
FUSIONKD=${FUSIONKD:-.venv/bin/fusionkd}
SEEDS=${SEEDS:-0 1 2}
WORKERS=${WORKERS:-2}          # processes side by side
THREADS=${THREADS:-1}          # torch threads per process
SUBSET=${SUBSET:-5000}         # stratified training subset (after the validation split)
EPOCHS=${EPOCHS:-10}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-15}
EVAL_EVERY=${EVAL_EVERY:-2}
MODEL=${MODEL:-resnet20}
TEACHER_MODEL=${TEACHER_MODEL:-resnet56}
PRECISION=${PRECISION:-bf16}
METHODS=${METHODS:-}           # override the family's method list (e.g. to split the work by hand)

COMMON="--dataset fashion-mnist --batch-size 64 --lr 0.05 --schedule cosine --nesterov true \
  --weight-decay 0.0005 --val-fraction 0.05 --data-seed 0 --eval-every $EVAL_EVERY --eval-batch-size 1000 \
  --precision $PRECISION --channels-last true --progress log"
[ -n "$SUBSET" ] && COMMON="$COMMON --subset $SUBSET"
[ -n "$THREADS" ] && COMMON="$COMMON --threads $THREADS"

# run NAME ARGS...: train into OUT/FAMILY/NAME unless finished; resume if interrupted
run() {
  local name=$1; shift
  local dir="$OUT/$FAMILY/$name"
  if [ -f "$dir/summary.json" ]; then echo "skip $name (finished)"; return 0; fi
  if [ -f "$dir/last.pt" ]; then
    echo "resume $name"; "$FUSIONKD" train --resume "$dir" >/dev/null 2>"$dir.err" || { cat "$dir.err"; return 1; }
  else
    echo "start $name"
    "$FUSIONKD" train $COMMON --out-dir "$OUT/$FAMILY" --name "$name" --overwrite "$@" >/dev/null 2>"$OUT/$FAMILY/$name.err" \
      || { tail -5 "$OUT/$FAMILY/$name.err"; return 1; }
  fi
  echo "done $name: $(python3 -c "import json,sys; s=json.load(open('$dir/summary.json')); h=s['deploy_head']; print(h, 'last', s['last']['test'][h], 'best-val', s['best']['test'][h])")"
}
export -f run
export OUT FAMILY FUSIONKD COMMON
mkdir -p "$OUT/$FAMILY"

jobs_for() {  # one line per run: NAME ARGS...
  local methods=$1 extra=$2
  for seed in $SEEDS; do for m in $methods; do
    echo "$m-$MODEL-s$seed --method $m --model $MODEL --seed $seed --epochs $EPOCHS $extra" | sed "s/ *$//"
  done; done
}
pool() { xargs -P "$1" -L 1 bash -c 'run "$@"' _; }

# The baseline rows are the same runs for every family (same protocol and seeds): they live in
# OUT/shared and every family's report includes them.
baselines() (  # a subshell: FAMILY changes only here
  FAMILY=shared; export FAMILY; mkdir -p "$OUT/shared"; jobs_for baseline "" | pool "$1"
)

case "$FAMILY" in
  online)  baselines "$WORKERS"; jobs_for "${METHODS:-dml one ffl_s ffl mfef}" "" | pool "$WORKERS" ;;
  self)    baselines "$WORKERS"; jobs_for "${METHODS:-byot frskd fmfsd}" "" | pool "$WORKERS" ;;
  offline)
    T="$OUT/offline/teacher-$TEACHER_MODEL"
    run "teacher-$TEACHER_MODEL" --method baseline --model "$TEACHER_MODEL" --seed 0 --epochs "$TEACHER_EPOCHS" &
    teacher=$!
    baselines 1                   # the students' baselines need no teacher: run them beside it
    wait "$teacher"
    jobs_for "${METHODS:-kd fitnet at mfkd}" "--teacher $T/best.pt" | pool "$WORKERS" ;;
  *) echo "unknown family $FAMILY" >&2; exit 2 ;;
esac
