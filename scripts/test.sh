#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: FEDSEEK_TEST_WORKERS parallel pytest-xdist workers
# (default 3: most tests wait on real servers and subprocesses, so 3 workers keep 2 cores busy);
# each module on one worker, the LocalFederation modules one after another (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -n "${FEDSEEK_TEST_WORKERS:-3}" --dist loadgroup "$@"
