#!/usr/bin/env bash
# The local demo: installs what it needs, starts its own mosquitto, runs the agent with the local
# app on a sample-video or synthetic camera, and prints the commands for the whole story.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m agent.demo "$@"
