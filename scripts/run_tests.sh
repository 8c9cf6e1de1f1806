#!/usr/bin/env bash
# README command (2): set up (idempotent pip install of the pinned requirements) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# the optional figures extra too, so tests cover scripts/figures.py
python3 -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-figures.txt
set +e
python3 -m pytest "$@"
rc=$?
set -e
# pytest exit 5 = "no tests collected": treat as failure so an empty suite never passes CI.
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests — failing" >&2
  exit 1
fi
exit "$rc"
