#!/usr/bin/env bash
# The second test runtime: the current ComfyUI source tree shipped beside the checkout in ../shared/runtimes/
# (ComfyUI-0.33.0.tar.gz, August 2026), checked against its sha256 and unpacked once into the git-ignored
# .runtime/comfyui-<version>/ComfyUI. Prints that path on its last line, for COMFYUI_PATH:
#
#   COMFYUI_PATH="$(bash scripts/current_runtime.sh)" bash scripts/test.sh
#
# FLOWGRPO_RUNTIME_TARBALL names another tarball of a ComfyUI tree (it must unpack to ComfyUI/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${FLOWGRPO_RUNTIME_TARBALL:-$ROOT/../shared/runtimes/ComfyUI-0.33.0.tar.gz}"
SHA256="bdebd618612bb72a8eee4d94ea018c77302628aa46fd384d8d1c97274f03a1f3"  # ../shared/runtimes/README.md

log() { printf '[current_runtime] %s\n' "$*" >&2; }
[ -f "$TARBALL" ] || { log "error: no $TARBALL (set FLOWGRPO_RUNTIME_TARBALL to a ComfyUI source tarball)"; exit 1; }
name="$(basename "$TARBALL" .tar.gz)"
dest="$ROOT/.runtime/${name,,}"
if [ ! -f "$dest/ComfyUI/main.py" ]; then
  if [ -z "${FLOWGRPO_RUNTIME_TARBALL:-}" ]; then
    got="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
    [ "$got" = "$SHA256" ] || { log "error: $TARBALL has sha256 $got, expected $SHA256"; exit 1; }
  fi
  log "unpacking $TARBALL into $dest"
  rm -rf "$dest.partial" && mkdir -p "$dest.partial"
  tar -xzf "$TARBALL" -C "$dest.partial"
  [ -f "$dest.partial/ComfyUI/main.py" ] || { log "error: $TARBALL does not unpack to ComfyUI/main.py"; exit 1; }
  rm -rf "$dest" && mv "$dest.partial" "$dest"
fi
echo "$dest/ComfyUI"
