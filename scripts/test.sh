#!/usr/bin/env bash
# The README's test command: bootstrap (idempotent), then run every test: tests/core (no ComfyUI) and
# tests/comfy (a real ComfyUI runtime, in-process and through its HTTP server on 127.0.0.1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" --test >/dev/null
cd "$ROOT"
exec .venv/bin/python -m pytest tests "$@"
