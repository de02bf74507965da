"""Reference reward server: any :class:`RewardBackend` behind ``POST /score`` and ``GET /health`` (protocol in
:mod:`.remote`). Run it in its own process (``python -m flowgrpo_core.rewards serve ...``) when a reward model pins
dependencies that clash with the trainer's, or in-process for tests.

Stdlib only (``http.server.ThreadingHTTPServer``); bound to 127.0.0.1 by default; JSON only, never pickle; backend
calls are serialised with a lock (reward models are rarely thread-safe).
"""

from __future__ import annotations

import hmac
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

from .base import RewardBackend
from .remote import API_KEY_HEADER, decode_images

__all__ = ["RewardServer", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 256 * 1024 * 1024


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values as lists/numbers, containers recursively, anything else unknown as its string."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


def _details_json(details: dict[str, Any], batch: int) -> dict[str, list]:
    """``details`` as ``{name: [B JSON values]}``; a value that is not per-sample (wrong length) is repeated."""
    out = {}
    for key, value in details.items():
        value = _jsonable(value)
        out[str(key)] = value if isinstance(value, list) and len(value) == batch else [value] * batch
    return out


def _parse_request(body: bytes) -> tuple[torch.Tensor, list[str], Optional[list]]:
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise _BadRequest(400, f"the body is not JSON ({e})") from None
    if not isinstance(payload, dict):
        raise _BadRequest(400, "the body must be a JSON object with 'images', 'prompts' and 'metadata'")
    encoded, prompts, metadata = payload.get("images"), payload.get("prompts"), payload.get("metadata")
    if not isinstance(encoded, list) or not encoded:
        raise _BadRequest(400, "'images' must be a non-empty list of base64 PNG strings")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(encoded):
        raise _BadRequest(400, f"'prompts' must be a list of {len(encoded)} strings (one per image)")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(encoded)):
        raise _BadRequest(400, f"'metadata' must be null or a list of {len(encoded)} entries (one per image)")
    try:
        images = decode_images(encoded)
    except ValueError as e:
        raise _BadRequest(400, str(e)) from None
    return images, prompts, metadata


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "flowgrpo-reward/1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.owner.log_requests:
            super().log_message(format, *args)

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _discard(self, length: int) -> None:
        """Reads and drops a refused body (up to ``max(4 x limit, 64 MB)``), so that the client gets the answer
        rather than a broken pipe while it is still sending."""
        self.close_connection = True
        left = min(length, max(4 * self.server.owner.max_body_bytes, 64 << 20))
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def _key_error(self) -> Optional[str]:
        """None when no key is required or the ``X-API-Key`` header matches, else what is wrong."""
        key = self.server.owner.api_key
        given = self.headers.get(API_KEY_HEADER, "")
        if key is None or hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
            return None
        return f"{'missing' if not given else 'wrong'} API key: send the server's key in the {API_KEY_HEADER} header"

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/health":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path!r}; use GET /health or "
                                                        f"POST /score"})
        elif self._key_error():
            self._reply(HTTPStatus.UNAUTHORIZED, {"error": self._key_error()})
        else:
            self._reply(HTTPStatus.OK, {"status": "ok", "backend": self.server.owner.backend.name})

    def do_POST(self) -> None:
        owner = self.server.owner
        if self.path.split("?")[0] != "/score":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path!r}; use POST /score"})
            return
        with owner._count_lock:
            owner.score_requests += 1
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "send a Content-Length header"})
            return
        key_error = self._key_error()
        if key_error:
            self._discard(length)
            self._reply(HTTPStatus.UNAUTHORIZED, {"error": key_error})
            return
        if length > owner.max_body_bytes:
            self._discard(length)
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        {"error": f"the body is {length} bytes, over the server's limit of {owner.max_body_bytes}; "
                                  f"send fewer images per request (lower batch_size)"})
            return
        try:
            images, prompts, metadata = _parse_request(self.rfile.read(length))
        except _BadRequest as e:
            self._reply(e.status, {"error": str(e)})
            return
        try:
            with owner._backend_lock:
                result = owner.backend.score(images, prompts, metadata)
            payload = {"scores": result.scores.tolist(), "details": _details_json(result.details, len(prompts))}
        except Exception as e:  # the backend's failure goes back to the client as text, never as a traceback
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                        {"error": f"reward {owner.backend.name!r} failed: {type(e).__name__}: {e}"})
            return
        self._reply(HTTPStatus.OK, payload)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: "RewardServer"


class RewardServer:
    """Serves ``backend`` over HTTP on ``host:port`` (port 0: a free port, read it from :attr:`url`).

    ``start()`` binds and serves from a background thread, ``stop()`` shuts down; also a context manager.
    ``api_key``: when set, requests without the matching ``X-API-Key`` header get 401. ``score_requests`` counts
    the ``POST /score`` requests received (whatever their outcome).
    """

    def __init__(self, backend: RewardBackend, host: str = "127.0.0.1", port: int = 0,
                 api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES, log_requests: bool = False):
        self.backend = backend
        self.host = host
        self.port = int(port)
        self.api_key = api_key or None
        self.max_body_bytes = int(max_body_bytes)
        self.log_requests = log_requests
        self.score_requests = 0
        self._count_lock = threading.Lock()
        self._backend_lock = threading.Lock()
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the reward server is not started; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def bind(self) -> "RewardServer":
        """Binds the socket without serving yet (``url`` is then known)."""
        if self._httpd is None:
            self._httpd = _HTTPServer((self.host, self.port), _Handler)
            self._httpd.owner = self
        return self

    def serve_forever(self) -> None:
        """Serves in the calling thread until :meth:`stop` is called from another thread or an exception (such as
        KeyboardInterrupt) ends it; the socket is closed on the way out."""
        self.bind()
        httpd = self._httpd
        try:
            httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd = None
            httpd.server_close()

    def start(self) -> "RewardServer":
        """Binds and serves from a daemon thread; returns self."""
        if self._thread is None:
            self.bind()
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"reward-server-{self.backend.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        if self._thread is not None:
            httpd.shutdown()
            self._thread.join()
            self._thread = None
        httpd.server_close()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
