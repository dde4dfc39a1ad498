#!/usr/bin/env bash
# Reproduce the shipped learned operators (Resources/Models/*.pt) with the project's own commands.
# CPU: about 10 min for the data (2 processes) and the training times stated in the model cards;
# on a GPU pass DEVICE=cuda and raise ITERATIONS.  Usage: bash scripts/train_models.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${PPCREG_DATA:-$HOME/.cache/ppcregistration/ppc_ds}}
RUNS=${2:-runs}
ITERATIONS=${ITERATIONS:-20000}
PPC_ITERATIONS=${PPC_ITERATIONS:-3000}
DEVICE=${DEVICE:-auto}
PPCREG=${PPCREG:-.venv/bin/ppcreg}
TRAIN_V=L3,L1,T12,T11,T10,T9,T7,T6,T5,T4,T3,T2,T1   # sample chest CT; T8 and L2 are held out for validation
export OMP_NUM_THREADS=1

# the data set (resumable; two processes share each split)
for part in 0 1; do
  "$PPCREG" make-dataset --sample --vertebrae "$TRAIN_V" --split train --samples 2400 --seed 1 --out "$DATA" --part $part 2 &
done
wait
for part in 0 1; do
  "$PPCREG" make-dataset --sample --vertebrae T8,L2 --split val --samples 400 --seed 2 --out "$DATA" --part $part 2 &
done
wait
# a second training split of the same vertebrae, another seed (used together with the first: train,train2)
for part in 0 1; do
  "$PPCREG" make-dataset --sample --vertebrae "$TRAIN_V" --split train2 --samples 2400 --seed 11 --out "$DATA" --part $part 2 &
done
wait

# Version 2 of the shipped models (see the model cards):
# 1. flow v1: the correlation level alone, from scratch on train (6,500 steps, best validation EPE at 5,250);
# 2. flow v2: v1 plus a stride-4 refinement level (warping + local cost volume), fine-tuned with mirror augmentation,
#    first on train, then on train,train2 (resumed from its checkpoint once train2 existed);
# 3. ppc-flow and ppc-flow-attention fine-tuned from flow v2 through the (damped) PPC layer, side by side.
"$PPCREG" train --method flow --data "$DATA" --out "$RUNS/flow_v1" --iterations 6500 --lr 5e-4 --refine-strides none \
  --device "$DEVICE"
"$PPCREG" train --method flow --data "$DATA" --train-split train,train2 --out "$RUNS/flow" --iterations "$ITERATIONS" \
  --lr 3e-4 --init "$RUNS/flow_v1/model.pt" --refine-strides 4 --augment --device "$DEVICE"
for m in ppc-flow ppc-flow-attention; do
  "$PPCREG" train --method $m --data "$DATA" --train-split train,train2 --out "$RUNS/$m" --iterations "$PPC_ITERATIONS" \
    --lr 2e-4 --out-of-plane 1 --augment --init "$RUNS/flow/model.pt" --device "$DEVICE" &
done
wait
echo "models: $RUNS/{flow,ppc-flow,ppc-flow-attention}/model.pt (copy them to Resources/Models/<method>.pt)"
