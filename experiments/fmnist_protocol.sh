#!/usr/bin/env bash
# The CPU-sized Fashion-MNIST protocol of docs/results.md, one `fusionkd compare` per family.
#
#   experiments/fmnist_protocol.sh online|self|offline|vit [OUT_DIR]
#
# Writes OUT_DIR/<family>-<model>/{results.csv,report.md,*.png} and the run folders under
# OUT_DIR/<family>-<model>/runs/<model>/<method>/s<seed>. compare skips finished runs and resumes interrupted ones,
# so the script can simply be re-run after a stop. The baseline runs are the same for every family (same
# protocol and seeds): they are trained once in OUT_DIR/shared and linked into each family's folder.
# MODEL (default resnet20) picks the deployed network, e.g. MODEL=wrn_16_2 for the self family's second table.
# The offline family first trains its teacher (OUT_DIR/teachers) and checks on validation that it beats
# the student baseline before any student run starts.
# The vit family trains a timm ViT-Tiny teacher (VIT_KWARGS, AdamW, VIT_EPOCHS on VIT_SUBSET images: all of the
# training split by default; the validation split is the students' and is never trained on), checks it on
# validation as above, then distils it into MODEL with METHODS (default kd,dkd,fitnet,mfkd) into OUT_DIR/vit-<model>;
# it runs in .venv-interop (timm), which `make test-interop` creates.
# The teachers' logs (OUT_DIR/teachers.log, OUT_DIR/vit-teacher.log) are appended to, never overwritten.
# For a GPU re-run at full size: SUBSET= EPOCHS=200 EVAL_EVERY=1 WORKERS=1 THREADS= PRECISION=bf16 ...
set -euo pipefail
FAMILY=${1:?family: online, self, offline or vit}
OUT=${2:-runs/results}
# the vit family needs timm: the second environment of `make test-interop` has it
[ "$FAMILY" = vit ] && DEFAULT_FUSIONKD=.venv-interop/bin/fusionkd || DEFAULT_FUSIONKD=.venv/bin/fusionkd
FUSIONKD=${FUSIONKD:-$DEFAULT_FUSIONKD}
mkdir -p "$OUT"
SEEDS=${SEEDS:-0,1,2}
WORKERS=${WORKERS:-2}          # processes side by side
THREADS=${THREADS-1}           # torch threads per process (THREADS= : compare's default)
SUBSET=${SUBSET-5000}          # stratified training subset after the validation split (SUBSET= : all)
EPOCHS=${EPOCHS:-10}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-30}
EVAL_EVERY=${EVAL_EVERY:-2}
MODEL=${MODEL:-resnet20}
TEACHER_MODEL=${TEACHER_MODEL:-resnet56}
PRECISION=${PRECISION:-bf16}
METHODS=${METHODS:-}           # override the family's method list (comma-separated)
VIT=timm:vit_tiny_patch16_224
VIT_KWARGS=${VIT_KWARGS:-"{img_size: 28, patch_size: 4, depth: 6}"}
VIT_EPOCHS=${VIT_EPOCHS:-10}
VIT_SUBSET=${VIT_SUBSET-}      # training images of the ViT teacher (empty: all of the training split)
VIT_OUT=${VIT_OUT:-}           # its compare folder (default OUT_DIR/vit-teacher)

# flags first, then key=value options (argparse takes the trailing positionals in one block)
FLAGS=(--dataset fashion-mnist --seeds "$SEEDS")
[ -n "$THREADS" ] && FLAGS+=(--threads "$THREADS")
COMMON=(batch_size=64 lr=0.05 schedule=cosine nesterov=true weight_decay=0.0005 val_fraction=0.05 data_seed=0
  eval_every="$EVAL_EVERY" eval_batch_size=1000 precision="$PRECISION" channels_last=true)
[ -n "$SUBSET" ] && COMMON+=(subset="$SUBSET")

DIR="$OUT/$FAMILY-$MODEL"      # this family's comparison

baselines() {  # baselines WORKERS: the shared baseline runs of MODEL, linked into DIR
  "$FUSIONKD" compare --methods baseline --models "$MODEL" --out "$OUT/shared" "${FLAGS[@]}" --workers "$1" \
    "${COMMON[@]}" epochs="$EPOCHS"
  mkdir -p "$DIR/runs/$MODEL"
  [ -e "$DIR/runs/$MODEL/baseline" ] || ln -s "$(realpath "$OUT/shared/runs/$MODEL/baseline")" \
    "$DIR/runs/$MODEL/baseline"
}

family() {  # family METHODS [key=value...]: compare baseline + METHODS into DIR
  "$FUSIONKD" compare --methods "baseline,$1" --models "$MODEL" --out "$DIR" "${FLAGS[@]}" \
    --workers "$WORKERS" "${COMMON[@]}" epochs="$EPOCHS" "${@:2}"
}

check_teacher() {  # check_teacher RUN: a teacher is only worth distilling from if it beats the student it
  # teaches; checked on validation (never on test) before spending the student runs
  python3 - "$1" "$OUT/shared/runs/$MODEL/baseline" <<'PY'
import glob, json, statistics, sys
teacher, baselines = sys.argv[1:]
t = json.load(open(f"{teacher}/summary.json"))["best"]["val"]["net"]
s = [json.load(open(p))["best"]["val"]["net"] for p in glob.glob(f"{baselines}/s*/summary.json")]
print(f"teacher val {t:.2f} vs student baseline val {statistics.mean(s):.2f} (max {max(s):.2f}, {len(s)} seeds)")
sys.exit(0 if t > max(s) else "the teacher does not beat the student baseline on validation: train it longer")
PY
}

case "$FAMILY" in
  online) baselines "$WORKERS"; family "${METHODS:-dml,one,ffl_s,ffl,mfef}" ;;
  self)   baselines "$WORKERS"; family "${METHODS:-byot,frskd,fmfsd}" ;;
  offline)
    # the teacher (one process) beside the student baselines (the other)
    T="$OUT/teachers/runs/$TEACHER_MODEL/baseline/s0"
    "$FUSIONKD" compare --methods baseline --models "$TEACHER_MODEL" --out "$OUT/teachers" \
      "${FLAGS[@]}" --seeds 0 --workers 1 "${COMMON[@]}" epochs="$TEACHER_EPOCHS" >>"$OUT/teachers.log" 2>&1 &
    teacher=$!
    baselines 1
    wait "$teacher" || { tail "$OUT/teachers.log"; exit 1; }
    check_teacher "$T"
    # the logit-standardization variants take the LS authors' resnet56 -> resnet20 settings (their logs/)
    LIST="${METHODS:-kd,fitnet,at,mfkd,dkd,dist,reviewkd,crd,kd@ls,dkd@ls}"
    LS=()
    [[ ",$LIST," == *",kd@ls,"* ]] && LS+=(kd@ls:logit_std=true kd@ls:temperature=2 kd@ls:kd_weight=9)
    [[ ",$LIST," == *",dkd@ls,"* ]] && LS+=(dkd@ls:logit_std=true dkd@ls:temperature=3 dkd@ls:alpha=18 dkd@ls:beta=36)
    if [ ${#LS[@]} -gt 0 ]; then
      family "$LIST" teacher="$T/best.pt" --method-options "${LS[@]}"
    else
      family "$LIST" teacher="$T/best.pt"
    fi ;;
  vit)
    # the ViT teacher (one process) beside the student baselines (the other); AdamW with a warm-up, as ViTs
    # are trained, where the students keep the protocol's SGD
    VDIR=${VIT_OUT:-$OUT/vit-teacher}
    T="$VDIR/runs/$VIT/baseline/s0"
    TFLAGS=(--dataset fashion-mnist --seeds 0 --workers 1)
    [ -n "$THREADS" ] && TFLAGS+=(--threads "$THREADS")
    TOPTS=(batch_size=64 schedule=cosine warmup_epochs=1 val_fraction=0.05 data_seed=0 eval_every="$EVAL_EVERY"
      eval_batch_size=1000 precision="$PRECISION" channels_last=true epochs="$VIT_EPOCHS"
      "model_kwargs=$VIT_KWARGS" optimizer=adamw lr=0.001 weight_decay=0.05)
    [ -n "$VIT_SUBSET" ] && TOPTS+=(subset="$VIT_SUBSET")
    mkdir -p "$(dirname "$VDIR")"
    "$FUSIONKD" compare --methods baseline --models "$VIT" --out "$VDIR" "${TFLAGS[@]}" "${TOPTS[@]}" \
      >>"$VDIR.log" 2>&1 &
    teacher=$!
    baselines 1
    wait "$teacher" || { tail "$VDIR.log"; exit 1; }
    check_teacher "$T"
    family "${METHODS:-kd,dkd,fitnet,mfkd}" teacher="$T/best.pt" ;;
  *) echo "unknown family $FAMILY (expected online, self, offline or vit)" >&2; exit 2 ;;
esac
