#!/usr/bin/env bash
# Paired fp32-vs-bf16 study (issue #13): the same runs, seeds and data, once in fp32 and once under bf16
# autocast, both with channels_last; one fp32 teacher shared by both arms for mfkd. Resumable: re-running it
# skips finished runs (fusionkd compare). Writes OUT/fp32, OUT/bf16 and OUT/paired.md.
#
#   bash benchmarks/precision_study.sh [OUT]            # CPU-sized protocol below (~1 h on 2 cores)
#   SUBSET=50000 EPOCHS=30 SEEDS=0-4 WORKERS=4 bash benchmarks/precision_study.sh runs/precision-full
set -euo pipefail
OUT=${1:-runs/precision}
PY=${PY:-python}
SUBSET=${SUBSET:-3000}
EPOCHS=${EPOCHS:-6}
SEEDS=${SEEDS:-0,1,2}
WORKERS=${WORKERS:-2}
THREADS=${THREADS:-1}
METHODS=${METHODS:-baseline,ffl,frskd,byot,mfkd}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
COMMON=(dataset=fashion-mnist subset="$SUBSET" val_fraction=0.1 epochs="$EPOCHS" batch_size=64 lr=0.05
        schedule=cosine nesterov=true weight_decay=5e-4 channels_last=true eval_every=2 eval_batch_size=1000)
mkdir -p "$OUT"
if [ -d "$OUT/teacher" ]; then  # resumes an interrupted teacher; says "already finished" otherwise
  OMP_NUM_THREADS=$THREADS $PY -m fusionkd train --resume "$OUT/teacher" progress=log
else
  OMP_NUM_THREADS=$THREADS $PY -m fusionkd train --method baseline --model resnet32 --out-dir "$OUT" \
    name=teacher precision=fp32 threads="$THREADS" progress=log "${COMMON[@]}" epochs="$TEACHER_EPOCHS"
fi
for prec in fp32 bf16; do
  OMP_NUM_THREADS=$THREADS $PY -m fusionkd compare --methods "$METHODS" --models resnet20 --seeds "$SEEDS" \
    --workers "$WORKERS" --threads "$THREADS" --out "$OUT/$prec" \
    "${COMMON[@]}" precision=$prec teacher="$OUT/teacher/best.pt"
done
$PY benchmarks/precision_table.py "$OUT/fp32" "$OUT/bf16" | tee "$OUT/paired.md"
