#!/usr/bin/env bash
# Set everything up and serve the browser app:
#   a virtual environment .venv (python3 -m venv; reused when it already has the pinned packages), the library
#   installed editable (pip install -e .) with requirements-app.txt (trame-slicer and slicer-core, one consistent
#   set of pins), the sample chest CT (downloaded once into $PPCREG_CACHE, default ~/.cache/ppcregistration),
#   then the app on http://$HOST:$PORT/ (default http://127.0.0.1:8080/: this machine only; HOST=0.0.0.0 serves
#   other machines too).  Uploads over $PPCREG_UPLOAD_LIMIT_MB (default 1024) are refused.  Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
REQ=requirements-app.txt
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8080}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore MPLBACKEND=Agg
# no display (a server, a container): VTK renders the Slicer views off-screen through EGL
if [ -z "${DISPLAY:-}" ]; then
    export VTK_DEFAULT_OPENGL_WINDOW=${VTK_DEFAULT_OPENGL_WINDOW:-vtkEGLRenderWindow}
fi

. "$ROOT/scripts/setup_venv.sh"

setup_venv

echo "[app] sample data"
if ! .venv/bin/ppcreg sample-data; then
    echo "[app] the sample CT could not be fetched now; upload a CT in the page, or try again later" >&2
fi

echo "[app] serving on http://$HOST:$PORT/ (Ctrl-C stops it)"
exec .venv/bin/python -m PPCRegistrationWeb --host "$HOST" --port "$PORT"
