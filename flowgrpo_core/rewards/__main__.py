"""``python -m flowgrpo_core.rewards serve --backend NAME [--host 127.0.0.1] [--port 8000] [--api-key KEY]``.

Serves one of the weight-free rewards (:data:`.simple.SIMPLE_REWARDS`) over the JSON protocol of :mod:`.remote`
and prints ``serving <backend> on http://HOST:PORT`` once the socket is bound. The API key can also come from the
``FLOWGRPO_REWARD_API_KEY`` environment variable (keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

from .simple import SIMPLE_REWARDS, SimpleReward
from .server import RewardServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowgrpo_core.rewards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a reward backend over HTTP (POST /score, GET /health)")
    serve.add_argument("--backend", required=True, choices=sorted(SIMPLE_REWARDS), help="the reward to serve")
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
    server = RewardServer(SimpleReward(args.backend), host=args.host, port=args.port, api_key=args.api_key,
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
