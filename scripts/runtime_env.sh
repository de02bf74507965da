# Sourced by scripts/bootstrap.sh, test.sh and demo.sh: which ComfyUI and which virtualenv this command uses.
#
# Default: the pinned ComfyUI 0.3.75 in .runtime/ComfyUI with the virtualenv .venv.
# COMFYUI_PATH set (the user's own ComfyUI, or the current runtime the CI unpacks): that ComfyUI with a virtualenv of
# its own, .venv-<its version> (from its comfyui_version.py), so the default runtime's environment is never touched.
# Sets ROOT, COMFY_VERSION ("" for the default until bootstrapped), VENV.
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ -n "${COMFYUI_PATH:-}" ]; then
  if [ ! -f "$COMFYUI_PATH/comfyui_version.py" ]; then
    printf '[flowgrpo] error: COMFYUI_PATH=%s is not a ComfyUI checkout (no comfyui_version.py)\n' "$COMFYUI_PATH" >&2
    exit 1
  fi
  COMFY_VERSION="$(sed -n 's/^__version__ *= *["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' "$COMFYUI_PATH/comfyui_version.py")"
  [ -n "$COMFY_VERSION" ] || { printf '[flowgrpo] error: no __version__ in %s/comfyui_version.py\n' "$COMFYUI_PATH" >&2; exit 1; }
  VENV="$ROOT/.venv-$COMFY_VERSION"
else
  COMFY_VERSION=""
  VENV="$ROOT/.venv"
fi
