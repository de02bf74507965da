#!/usr/bin/env bash
# The README's main-job command: bootstrap (idempotent), then a headless demo GRPO run on CPU that prints the
# mean reward of every iteration.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" >/dev/null
cd "$ROOT"
exec .venv/bin/python -m flowgrpo_core.demo "$@"
