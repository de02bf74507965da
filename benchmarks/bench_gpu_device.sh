#!/bin/bash
# bench_gpu.py on a lent GPU machine that has no network (issue 22). Two steps:
#
#   bash benchmarks/bench_gpu_device.sh prepare      # here: fills .gpu/ (ignored: add /.gpu/ to .git/info/exclude)
#   bash .gpu/bench_gpu_device.sh run [bench_gpu.py arguments]   # there, with .gpu carried; results in $OUT
#
# prepare: the wheels ComfyUI 0.3.75's in-process import and the test helpers need beyond that machine's Python 3.12
# packages (av, torchsde, trampoline, websocket-client), ComfyUI itself (.runtime/ComfyUI without custom_nodes and
# tests, as .tar.xz) and the committed pack (git archive of HEAD), with this script. run: installs the wheels into
# /tmp/site, unpacks ComfyUI and the pack into /tmp, and runs bench_gpu.py --device cuda with its log and JSON
# lines in $OUT (BENCH_TIMEOUT seconds at most, default 450).
set -o pipefail
case "$1" in
prepare)
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    cd "$ROOT" && mkdir -p .gpu/whl || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
        av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 websocket-client==1.9.2 || exit 2
    (cd .runtime && tar --exclude='ComfyUI/custom_nodes' --exclude='ComfyUI/tests' --exclude='ComfyUI/tests-unit' \
        --exclude='__pycache__' -cJf "$ROOT/.gpu/ComfyUI.tar.xz" ComfyUI) || exit 3
    git archive --format=tar.gz -o .gpu/pack.tar.gz HEAD && git rev-parse HEAD > .gpu/pack.commit || exit 4
    cp benchmarks/bench_gpu_device.sh .gpu/
    du -sh .gpu ;;
run)
    shift
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    HERE=$(cd "$(dirname "$0")" && pwd)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$HERE"/whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site
    rm -rf /tmp/pack /tmp/ComfyUI && mkdir -p /tmp/pack/.runtime
    tar -xzf "$HERE/pack.tar.gz" -C /tmp/pack && tar -xJf "$HERE/ComfyUI.tar.xz" -C /tmp || exit 4
    echo /tmp/ComfyUI > /tmp/pack/.runtime/comfyui_path
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      cat "$HERE/pack.commit"; } 2>&1 | tee "$OUT/env.txt"
    cd /tmp/pack/benchmarks
    PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-450}" python3 bench_gpu.py --device cuda --out "$OUT/bench_gpu.jsonl" \
        "$@" 2>&1 | tee "$OUT/bench_gpu.log"
    echo "exit $?" ;;
*)
    echo "usage: $0 prepare | run [bench_gpu.py arguments]" >&2; exit 64 ;;
esac
