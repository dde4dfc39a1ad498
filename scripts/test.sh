#!/usr/bin/env bash
# Set everything up and run the test suite:
#   a virtual environment .venv (python3 -m venv; reused when it already has the pinned packages),
#   the library installed editable (pip install -e .) with the test requirements, then pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k cli -x
# Real patient data for the tests: ../shared/data next to the project, or $PPCREG_SHARED_DATA (tests that need
# it skip with a message when it is absent).  Sample data cache: $PPCREG_CACHE (default ~/.cache/ppcregistration).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
REQ=requirements-test.txt

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore MPLBACKEND=Agg

. "$ROOT/scripts/setup_venv.sh"

setup_venv
echo "[test] python -m pytest $*"
exec .venv/bin/python -m pytest -ra "$@"
