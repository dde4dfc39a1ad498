#!/usr/bin/env bash
# Reproduce the shipped learned operators (Resources/Models/*.pt) with the project's own commands.
# CPU: about 20 min for the data (2 processes) and the training times stated in the model cards;
# on a GPU pass DEVICE=cuda and raise FLOW_ITERATIONS / PPC_ITERATIONS.  Usage: bash scripts/train_models.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${PPCREG_DATA:-$HOME/.cache/ppcregistration/ppc_ds}}
RUNS=${2:-runs}
PPC_ITERATIONS=${PPC_ITERATIONS:-500}
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

# Version 2 of the shipped models (the model cards give the validation numbers of each step):
# 1. flow v1: the correlation level alone, from scratch on train (6,500 steps; the v1 weights were step 5,250);
"$PPCREG" train --method flow --data "$DATA" --out "$RUNS/flow_v1" --iterations 6500 --lr 5e-4 --refine-strides none \
  --device "$DEVICE"
# 2. flow v2: v1 plus a stride-4 refinement level, fine-tuned in phases, each a resume of $RUNS/flow from its
#    checkpoint: mirroring on train; then train,train2; then magnification up to 1.4x; then a lower learning rate.
#    model.pt keeps the best validation (step 3,250 in the shipped run).
V2=(--method flow --data "$DATA" --out "$RUNS/flow" --init "$RUNS/flow_v1/model.pt" --refine-strides 4 --augment
    --device "$DEVICE")
"$PPCREG" train "${V2[@]}" --iterations 1250 --lr 3e-4
"$PPCREG" train "${V2[@]}" --train-split train,train2 --iterations 1500 --lr 3e-4
"$PPCREG" train "${V2[@]}" --train-split train,train2 --zoom 1.4 --iterations 3000 --lr 3e-4
"$PPCREG" train "${V2[@]}" --train-split train,train2 --zoom 1.4 --iterations "${FLOW_ITERATIONS:-3250}" --lr 1e-4
# 3. ppc-flow and ppc-flow-attention fine-tuned from flow v2 through the (damped) PPC layer, side by side
#    (the shipped weights: step 250 of 500).
for m in ppc-flow ppc-flow-attention; do
  "$PPCREG" train --method $m --data "$DATA" --train-split train,train2 --out "$RUNS/$m" --iterations "$PPC_ITERATIONS" \
    --lr 5e-5 --out-of-plane 1 --augment --zoom 1.4 --init "$RUNS/flow/model.pt" --device "$DEVICE" &
done
wait
echo "models: $RUNS/{flow,ppc-flow,ppc-flow-attention}/model.pt (copy them to Resources/Models/<method>.pt)"
