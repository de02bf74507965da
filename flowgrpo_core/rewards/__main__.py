"""``python -m flowgrpo_core.rewards serve --backend NAME [--weights W] [--models-dir DIR] [--device cpu]
[--dtype float32] [--host 127.0.0.1] [--port 8000] [--api-key KEY]``.

Serves a weight-free reward (:data:`.simple.SIMPLE_REWARDS`) or a model backend of :mod:`.registry` (weights from
``--models-dir``, default ``$FLOWGRPO_REWARD_MODELS`` or ``./models/reward_models``) over the JSON protocol of
:mod:`.remote`, and prints ``serving <backend> on http://HOST:PORT`` once the socket is bound. Exit status 2 when
the backend cannot be built (missing weights or package), with the reason on stderr. The API key can also come from the
``FLOWGRPO_REWARD_API_KEY`` environment variable (keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

import torch

from .registry import BACKENDS, MissingDependencyError, build_backend
from .server import RewardServer
from .simple import SIMPLE_REWARDS, SimpleReward
from .weights import MissingWeightsError, WeightsFormatError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowgrpo_core.rewards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a reward backend over HTTP (POST /score, GET /health)")
    serve.add_argument("--backend", required=True, choices=[*SIMPLE_REWARDS, *BACKENDS], help="the reward to serve")
    serve.add_argument("--weights", default="", help="weights file or folder (name under --models-dir, or an "
                                                     "absolute path); default: the backend's standard name")
    serve.add_argument("--models-dir", default=os.environ.get("FLOWGRPO_REWARD_MODELS", "models/reward_models"),
                       help="where weights are looked up (default: $FLOWGRPO_REWARD_MODELS or "
                            "./models/reward_models)")
    serve.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu or cuda:1")
    serve.add_argument("--dtype", default="float32", choices=list(_DTYPES), help="compute dtype of the model")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    serve.add_argument("--api-key", default=os.environ.get("FLOWGRPO_REWARD_API_KEY"),
                       help="require this X-API-Key header (default: $FLOWGRPO_REWARD_API_KEY, else none)")
    serve.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    return parser


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        backend = (SimpleReward(args.backend) if args.backend in SIMPLE_REWARDS else
                   build_backend(args.backend, args.weights, [args.models_dir], args.device, _DTYPES[args.dtype]))
    except (MissingWeightsError, WeightsFormatError, MissingDependencyError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    server = RewardServer(backend, host=args.host, port=args.port, api_key=args.api_key,
                          log_requests=args.log_requests).bind()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach the port can use it",
              file=sys.stderr, flush=True)
    print(f"serving {args.backend} on {server.url}", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
