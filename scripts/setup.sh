#!/usr/bin/env bash
# Create .venv with FedSeek and its pinned dependencies (CPU torch wheel). Idempotent.
# As root with apt-get, also installs the Debian packages the platform tests start for real:
# PostgreSQL (server binaries), Chromium + chromedriver (dashboard test) and docker-compose
# (validates docker-compose.yml with `docker-compose config`; no Docker engine is started).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${missing[*]}"
  (apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; }) ||
   echo "warning: could not install ${missing[*]}; the tests that need them will be skipped" >&2
fi
# docker-compose only validates the compose file (no engine is started): skip the engine it recommends
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 &&
     apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1; }) ||
    echo "warning: could not install docker-compose; tests/test_compose.py will skip its checks" >&2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA wheel
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
