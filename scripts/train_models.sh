#!/usr/bin/env bash
# Reproduce the shipped learned operators (Resources/Models/*.pt) with the project's own commands.
# CPU: about 30 min for the data (2 processes) and the training times stated in the model cards;
# on a GPU pass DEVICE=cuda and raise the iteration counts.  Usage: bash scripts/train_models.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${PPCREG_DATA:-$HOME/.cache/ppcregistration/ppc_ds}}
RUNS=${2:-runs}
ARM_ITERATIONS=${ARM_ITERATIONS:-1500}
DEVICE=${DEVICE:-auto}
PPCREG=${PPCREG:-.venv/bin/ppcreg}
TRAIN_V=L3,L1,T12,T11,T10,T9,T7,T6,T5,T4,T3,T2,T1   # sample chest CT; T8 and L2 are held out for validation
export OMP_NUM_THREADS=1

# the data set (resumable; two processes share each split): four training splits of the 13 training vertebrae
# (train_lowres: the CT resampled to 3 mm voxels, the resolution of the lumbar test CT) and the validation split
split() {  # NAME SEED VERTEBRAE SAMPLES [extra make-dataset options]
  local name=$1 seed=$2 vert=$3 n=$4
  shift 4
  for part in 0 1; do
    "$PPCREG" make-dataset --sample --vertebrae "$vert" --split "$name" --samples "$n" --seed "$seed" --out "$DATA" \
      --part $part 2 "$@" &
  done
  wait
}
split val 2 T8,L2 400
split train 1 "$TRAIN_V" 2400
split train2 11 "$TRAIN_V" 2400
split train3 21 "$TRAIN_V" 2400
split train_lowres 31 "$TRAIN_V" 2400 --resample-mm 3
split val_lowres 2 T8,L2 400 --resample-mm 3   # (a second validation set; not used to select the models)

# 1. flow v1 and v2 as shipped before (v1: the stride-8 correlation level alone; v2: plus a stride-4 refinement level,
#    mirroring, train,train2, magnification up to 1.4x), each a resume of its folder from its checkpoint.
"$PPCREG" train --method flow --data "$DATA" --out "$RUNS/flow_v1" --iterations 6500 --lr 5e-4 --refine-strides none \
  --device "$DEVICE"
V2=(--method flow --data "$DATA" --out "$RUNS/flow_v2" --init "$RUNS/flow_v1/model.pt" --refine-strides 4 --augment
    --device "$DEVICE")
"$PPCREG" train "${V2[@]}" --iterations 1250 --lr 3e-4
"$PPCREG" train "${V2[@]}" --train-split train,train2 --iterations 1500 --lr 3e-4
"$PPCREG" train "${V2[@]}" --train-split train,train2 --zoom 1.4 --iterations 3000 --lr 3e-4
"$PPCREG" train "${V2[@]}" --train-split train,train2 --zoom 1.4 --iterations 3250 --lr 1e-4
# 2. flow v3: a stride-16 correlation level (+-64 px) refined at strides 8 and 4, started from v2 (its encoder and its
#    stride-4 level are copied); 1,500 steps on train,train2, then all four training splits; lr 3e-4 up to step 4,000.
V3=(--method flow --data "$DATA" --out "$RUNS/flow" --augment --zoom 1.4 --device "$DEVICE")
"$PPCREG" train "${V3[@]}" --init "$RUNS/flow_v2/model.pt" --stride 16 --refine-strides 8,4 --train-split train,train2 \
  --iterations 1500 --lr 3e-4
ALL=train,train2,train3,train_lowres
"$PPCREG" train "${V3[@]}" --train-split $ALL --iterations 4000 --lr 3e-4
cp "$RUNS/flow/model_last.pt" "$RUNS/flow_step4000.pt"
# 3. the comparison of the paper's three models: from the same step-4,000 weights, the same data, augmentation, learning
#    rate and number of steps; Flow goes on with the end-point error (a resume of its run), PPC Flow and PPC Flow
#    Attention train through the PPC layer (mTRE + EPE; the attention sees the matching evidence). Shipped: the last
#    weights of each (model_last.pt).
"$PPCREG" train "${V3[@]}" --train-split $ALL --iterations $((4000 + ARM_ITERATIONS)) --lr 1e-4 &
for m in ppc-flow ppc-flow-attention; do
  "$PPCREG" train --method $m --data "$DATA" --out "$RUNS/$m" --augment --zoom 1.4 --device "$DEVICE" \
    --train-split $ALL --iterations "$ARM_ITERATIONS" --lr 1e-4 --init "$RUNS/flow_step4000.pt" &
done
wait
# 4. the learned operator alone (method `learned`, docs/design.md 5.4): the normal matcher trained on its own unrolled
#    trajectories through the damped PPC solve, on two training patients, validated on the third (never the lumbar
#    test patient); one CPU core, 2,700 s.  Shipped: learned.pt with its card and curves.
"$PPCREG" train-learned --train sample --train popi_thorax --val lidc0314_chest --out "$RUNS/learned" \
  --out-of-plane 0.1 --budget 2700
echo "models: $RUNS/{flow,ppc-flow,ppc-flow-attention}/model_last.pt (copy them to Resources/Models/<method>.pt)"
echo "        $RUNS/learned/learned.{pt,md,curves.csv} (copy them to Resources/Models/)"
