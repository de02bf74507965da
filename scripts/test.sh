#!/usr/bin/env bash
# The README's test command: bootstrap (idempotent), then run every test: tests/core (no ComfyUI) and
# tests/comfy (a real ComfyUI runtime, in-process and through its HTTP server on 127.0.0.1).
# With COMFYUI_PATH set, the same suite runs against that ComfyUI in its own virtualenv (.venv-<version>).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/runtime_env.sh"  # VENV
bash "$ROOT/scripts/bootstrap.sh" --test >/dev/null
cd "$ROOT"
"$VENV/bin/python" -m flowgrpo runtime  # the runtime this run tests, on its first line
exec "$VENV/bin/python" -m pytest tests "$@"
