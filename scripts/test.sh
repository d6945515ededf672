#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, type check, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check agent tests bench
echo "== mypy"
.venv/bin/mypy
echo "== import layers"
.venv/bin/lint-imports
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
