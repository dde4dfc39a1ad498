# Shared by demo.sh and test.sh: make .venv (python3 -m venv) and install the project editable with the pinned
# requirements file $REQ, unless every pin is already installed and PPCRegistrationLib is this checkout ($ROOT).
setup_venv() {
    local py=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        echo "[setup] creating the virtual environment .venv ($($py --version))"
        "$py" -m venv .venv
    fi
    # Up to date when every pinned requirement is installed at its version and PPCRegistrationLib is this
    # checkout's (installed editable).
    if .venv/bin/python - "$REQ" "$ROOT" <<'PY'
import re, sys
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
except ImportError:
    sys.exit(1)
if Path(PPCRegistrationLib.__file__).resolve().parents[1] != Path(sys.argv[2]).resolve():
    sys.exit(1)
try:
    metadata.version("ppcregistration")
except metadata.PackageNotFoundError:
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
