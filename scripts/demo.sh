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

setup_venv() {
    local py=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        echo "[setup] creating the virtual environment .venv ($($py --version))"
        "$py" -m venv .venv
    fi
    # Up to date when every pinned requirement is installed at its version and PPCRegistrationLib is this
    # checkout's (installed editable).
    if .venv/bin/python - "$REQ" "$ROOT" <<'PY'
import sys
from importlib import metadata
from pathlib import Path

def pins(path):
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            yield from pins(Path(path).parent / line[2:].strip())
        elif "==" in line:
            name, ver = (s.strip() for s in line.split("==", 1))
            yield name, ver

for name, ver in pins(sys.argv[1]):
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != ver:
        sys.exit(1)
try:
    import PPCRegistrationLib
    metadata.version("ppcregistration")
except (ImportError, metadata.PackageNotFoundError):
    sys.exit(1)
if Path(PPCRegistrationLib.__file__).resolve().parents[1] != Path(sys.argv[2]).resolve():
    sys.exit(1)
PY
    then
        echo "[setup] .venv is up to date ($REQ)"
    else
        echo "[setup] installing PPCRegistrationLib (editable) and $REQ into .venv"
        .venv/bin/python -m pip install --quiet "setuptools>=64"
        .venv/bin/python -m pip install --quiet -e . -r "$REQ"
    fi
}

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
