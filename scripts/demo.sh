#!/usr/bin/env bash
# Set everything up and run the main job:
#   a virtual environment .venv (python3 -m venv; reused when it already has the pinned packages), the library
#   installed editable (pip install -e .) with requirements.txt, the sample chest CT (downloaded once into
#   $PPCREG_CACHE, default ~/.cache/ppcregistration), then a registration of the sample CT (vertebra T8) to a
#   simulated X-ray, printing the mTRE per iteration and writing an overlay picture and a result file.
# Output: output/demo/ (override with DEMO_OUT=<dir>); DEMO_SEED / DEMO_MTRE choose the case.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
REQ=requirements.txt
OUT=${DEMO_OUT:-output/demo}
SEED=${DEMO_SEED:-0}
MTRE=${DEMO_MTRE:-10}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore MPLBACKEND=Agg

. "$ROOT/scripts/setup_venv.sh"

setup_venv
PPCREG=.venv/bin/ppcreg

echo "[demo] sample data"
"$PPCREG" sample-data

echo "[demo] simulating an X-ray of the sample chest CT (vertebra T8), initial mTRE $MTRE mm, seed $SEED"
"$PPCREG" simulate --sample --out "$OUT/case" --seed "$SEED" --mtre "$MTRE"

echo "[demo] registering"
"$PPCREG" register --sample --xray "$OUT/case/xray.nrrd" --geometry "$OUT/case/geometry.json" \
    --init "$OUT/case/T_init.json" --gt "$OUT/case/T_gt.json" --out "$OUT/registration"

echo
echo "[demo] done: overlay picture $OUT/registration/overlay.png, result $OUT/registration/result.json"
