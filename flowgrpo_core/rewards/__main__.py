"""``python -m flowgrpo_core.rewards serve --backend NAME [--weights W] [--models-dir DIR] [--device cpu]
[--dtype float32] [--host 127.0.0.1] [--port 8000] [--api-key KEY | --allow-unauthenticated] [limits]``.

Serves a weight-free reward (:data:`.simple.SIMPLE_REWARDS`) or a model backend of :mod:`.registry` (weights from
``--models-dir``, default ``$FLOWGRPO_REWARD_MODELS`` or ``./models/reward_models``) over the JSON protocol of
:mod:`.remote`, and prints ``serving <backend> on http://HOST:PORT`` once the socket is bound. Exit status 2 when
the backend cannot be built (missing weights or package) or the address needs an API key, with the reason on stderr.
The API key can also come from the ``FLOWGRPO_REWARD_API_KEY`` environment variable (keeps it out of the process
list). A host that is not a loopback address is refused without a key unless ``--allow-unauthenticated`` is given.
The limits (``--max-body-bytes``, ``--max-image-pixels``, ``--max-request-pixels``, ``--score-chunk-pixels``,
``--read-timeout``, ``--max-concurrent``) are described in :mod:`.server` and docs/reward-models.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

import torch

from .images import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS, parse_pixels
from .registry import BACKENDS, MissingDependencyError, build_backend
from .server import (DEFAULT_MAX_CONCURRENT, DEFAULT_READ_TIMEOUT, MAX_BODY_BYTES, SCORE_CHUNK_PIXELS, RewardServer,
                     UnsafeBindError, check_bind, is_loopback)
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
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; any other address "
                                                        "needs --api-key or --allow-unauthenticated)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    serve.add_argument("--api-key", default=os.environ.get("FLOWGRPO_REWARD_API_KEY"),
                       help="require this X-API-Key header (default: $FLOWGRPO_REWARD_API_KEY, else none)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve on a non-loopback --host without an API key (only on a network you trust)")
    limits = serve.add_argument_group("limits", "what one request may cost (413, 408 or 503 beyond)")
    limits.add_argument("--max-body-bytes", type=_positive_int, default=MAX_BODY_BYTES,
                        help=f"largest request body in bytes (default {MAX_BODY_BYTES}, 256 MiB)")
    limits.add_argument("--max-image-pixels", type=_pixels, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest image, as N or WIDTHxHEIGHT (default 4096x4096)")
    limits.add_argument("--max-request-pixels", type=_pixels, default=DEFAULT_MAX_REQUEST_PIXELS,
                        help="most pixels of all the images of one request, as N or WIDTHxHEIGHT (default "
                             f"{DEFAULT_MAX_REQUEST_PIXELS}: 64 images of 1024x1024)")
    limits.add_argument("--score-chunk-pixels", type=_pixels, default=SCORE_CHUNK_PIXELS,
                        help=f"pixels handed to the backend as float32 at once (default {SCORE_CHUNK_PIXELS}; at "
                             f"least one image)")
    limits.add_argument("--read-timeout", type=_positive_float, default=DEFAULT_READ_TIMEOUT,
                        help=f"seconds a request (headers and body) may take to arrive (default "
                             f"{DEFAULT_READ_TIMEOUT:g})")
    limits.add_argument("--max-concurrent", type=_positive_int, default=DEFAULT_MAX_CONCURRENT,
                        help=f"connections served at once; more get 503 with Retry-After (default "
                             f"{DEFAULT_MAX_CONCURRENT})")
    serve.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    return parser


def _pixels(text: str) -> int:
    try:
        return parse_pixels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_bind(args.host, args.api_key, args.allow_unauthenticated)  # before a model takes minutes to load
    except UnsafeBindError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        backend = (SimpleReward(args.backend) if args.backend in SIMPLE_REWARDS else
                   build_backend(args.backend, args.weights, [args.models_dir], args.device, _DTYPES[args.dtype]))
    except (MissingWeightsError, WeightsFormatError, MissingDependencyError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    server = RewardServer(backend, host=args.host, port=args.port, api_key=args.api_key,
                          allow_unauthenticated=args.allow_unauthenticated, max_body_bytes=args.max_body_bytes,
                          max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
                          score_chunk_pixels=args.score_chunk_pixels, read_timeout=args.read_timeout,
                          max_concurrent=args.max_concurrent, log_requests=args.log_requests).bind()
    if not server.api_key and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key (--allow-unauthenticated): anyone who can reach "
              f"the port can use it", file=sys.stderr, flush=True)
    print(f"serving {args.backend} on {server.url}", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
