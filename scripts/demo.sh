#!/usr/bin/env bash
# The README's main-job command: bootstrap (idempotent), build the tiny demo models, then run the tiny GRPO example
# workflow (example_workflows/flowgrpo_tiny_demo.json) headlessly through a ComfyUI server on CPU. Prints the reward
# mean ± std of every iteration, then the LoRA path and the reward-curve PNG. Extra arguments go to
# `python -m flowgrpo demo` (e.g. --set "GRPO Train.iterations=40"). With COMFYUI_PATH set it runs on that ComfyUI,
# in its own virtualenv (.venv-<version>).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/runtime_env.sh"  # VENV
bash "$ROOT/scripts/bootstrap.sh" >/dev/null
cd "$ROOT"
exec "$VENV/bin/python" -m flowgrpo demo "$@"
