"""Reference reward server: any :class:`RewardBackend` behind ``POST /score`` and ``GET /health`` (protocol in
:mod:`.remote`). Run it in its own process (``python -m flowgrpo_core.rewards serve ...``) when a reward model pins
dependencies that clash with the trainer's, or in-process for tests.

Stdlib only (``http.server.ThreadingHTTPServer``); JSON only, never pickle. What one request can cost is bounded
(defaults in brackets; docs/reward-models.md, "Reward server limits"):

* the body: ``max_body_bytes`` [256 MiB], else 413; it is read into one buffer, decoded to text and parsed (about
  2 x the body at the peak), and refused with 413 when it holds more than ``max_json_values`` [1,000,000] JSON values;
* the images: each PNG's size is read from its header before anything is decoded; an image over
  ``max_image_pixels`` [4096 x 4096] or a request over ``max_request_pixels`` [64 x 1024 x 1024] is refused with 413
  (:mod:`.images`); accepted images are kept as uint8 and handed to the backend as float32 in chunks of at most
  ``score_chunk_pixels`` [16 Mi] pixels (at least one image);
* decoding and scoring run under one lock (reward models are rarely thread-safe), so only one request's pixels are
  in memory at a time;
* time: each request (request line, headers and body) must arrive within ``read_timeout`` seconds [60] of the
  server starting to wait for it, else the connection is closed (408 when the body stalled); the socket timeout is
  the same, so a client that stops reading its answer is dropped as well;
* connections: at most ``max_concurrent`` [2] are served at once (one thread each); a connection beyond that gets
  503 with ``Retry-After: 1`` and is closed (the client retries it);
* binding to anything but a loopback address needs an API key, or ``allow_unauthenticated=True``
  (``--allow-unauthenticated``): :class:`UnsafeBindError` otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

from .base import RewardBackend
from .images import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS, ImageLimits, ImageTooLarge,
                     decode_png_batch)
from .remote import API_KEY_HEADER

__all__ = ["RewardServer", "UnsafeBindError", "check_bind", "is_loopback", "MAX_BODY_BYTES", "DEFAULT_READ_TIMEOUT",
           "DEFAULT_MAX_CONCURRENT", "SCORE_CHUNK_PIXELS", "MAX_JSON_VALUES"]

MAX_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_CONCURRENT = 2
SCORE_CHUNK_PIXELS = 16 * 1024 * 1024
MAX_JSON_VALUES = 1_000_000
#: connections over ``max_concurrent`` answered 503 at once (each by a short-lived thread); beyond, closed unanswered
_MAX_REFUSERS = 8
#: how long a refused connection is drained after its 503, so the client reads the answer rather than a reset
_REFUSE_DRAIN_S = 1.0

# The flag that raises each limit, named in the 413 answers.
_FLAGS = {"max_body_bytes": "--max-body-bytes", "max_image_pixels": "--max-image-pixels",
          "max_request_pixels": "--max-request-pixels", "max_json_values": "max_json_values (an argument of RewardServer)"}


class UnsafeBindError(ValueError):
    """Serving beyond loopback without an API key, and without the explicit opt-out."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


class _Timeout(Exception):
    """The request did not arrive within the read timeout; ``args[0]``: the bytes of the body read by then."""


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (``""`` means every interface: False)."""
    host = (host or "").strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, api_key: Optional[str], allow_unauthenticated: bool = False) -> None:
    """:class:`UnsafeBindError` when ``host`` is not a loopback address and there is neither an API key nor the
    explicit opt-out (the message names both fixes)."""
    if not api_key and not allow_unauthenticated and not is_loopback(host):
        raise UnsafeBindError(
            f"Refusing to serve on {host or 'every interface'} without an API key: anyone who can reach this port "
            f"could use the reward server and its hardware. Set a key with --api-key KEY (or the "
            f"FLOWGRPO_REWARD_API_KEY environment variable) and give the same key to the FlowGRPO Reward Server node, "
            f"or bind to 127.0.0.1; on a network you trust, --allow-unauthenticated serves without a key.")


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


def _too_large(message: str, limit: str, value: int, maximum: int, fix: str) -> _BadRequest:
    return _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"{message}. {fix}, or start the server with a higher {_FLAGS[limit]}",
                       limit=limit, value=int(value), max=int(maximum))


def _body_text(body: bytearray, max_json_values: int) -> str:
    """The body as text, after checking how many JSON values it can hold."""
    # Every JSON value after the first is preceded by one of these (base64 has none of them), so their count bounds
    # the number of Python objects that parsing can create.
    values = sum(body.count(c) for c in (b",", b":", b"[", b"{")) + 1
    if values > max_json_values:
        raise _too_large(f"the body holds up to {values} JSON values, over the limit of {max_json_values}",
                         "max_json_values", values, max_json_values, "Send less metadata per request")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRequest(400, f"the body is not UTF-8 JSON ({e})") from None


def _parse_request(text: str) -> tuple[list, list[str], Optional[list]]:
    """The body's ``images`` (still base64), ``prompts`` and ``metadata``."""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _BadRequest(400, f"the body is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict):
        raise _BadRequest(400, "the body must be a JSON object with 'images', 'prompts' and 'metadata'")
    encoded, prompts, metadata = payload.get("images"), payload.get("prompts"), payload.get("metadata")
    if not isinstance(encoded, list) or not encoded:
        raise _BadRequest(400, "'images' must be a non-empty list of base64 PNG strings")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(encoded):
        raise _BadRequest(400, f"'prompts' must be a list of {len(encoded)} strings (one per image)")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(encoded)):
        raise _BadRequest(400, f"'metadata' must be null or a list of {len(encoded)} entries (one per image)")
    return encoded, prompts, metadata


def _score_in_chunks(backend: RewardBackend, images: torch.Tensor, prompts: list[str], metadata: Optional[list],
                     chunk_pixels: int) -> dict:
    """The JSON answer for ``images`` ``[B, H, W, 3]`` uint8, scored as float32 ``[0, 1]`` in chunks of at most
    ``chunk_pixels`` pixels (at least one image), so the float copy never exceeds one chunk."""
    batch, height, width = images.shape[:3]
    step = max(1, chunk_pixels // (height * width))
    scores: list[float] = []
    details: dict[str, list] = {}
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        chunk = images[start:stop].float().div_(255.0)
        result = backend.score(chunk, prompts[start:stop], None if metadata is None else metadata[start:stop])
        del chunk
        part = _details_json(result.details, stop - start)
        for key in set(details) | set(part):  # a detail missing from some chunks is padded with None
            details.setdefault(key, [None] * start).extend(part.get(key, [None] * (stop - start)))
        scores.extend(result.scores.tolist())
    return {"scores": scores, "details": details}


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "flowgrpo-reward/1"

    def setup(self) -> None:
        self.timeout = self.server.owner.read_timeout  # the socket timeout of every read and write
        self._deadline = float("inf")
        super().setup()

    def handle_one_request(self) -> None:
        # The whole request (line, headers, body) must arrive before this deadline; the server's watchdog shuts the
        # socket's reading side when it passes (a client trickling its headers byte by byte is cut off too).
        self._deadline = time.monotonic() + self.server.owner.read_timeout
        self.server.watch(self.connection, self._deadline)
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self.connection)

    def _arrived(self) -> None:
        """The request is in: no deadline while the backend works; the socket timeout still bounds the answer."""
        self.server.unwatch(self.connection)
        self.connection.settimeout(self.server.owner.read_timeout)

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

    def _read_into(self, view: memoryview) -> int:
        """Fills ``view`` from the body before the deadline; returns the bytes read (fewer: the client closed).
        :class:`_Timeout` when the deadline passes."""
        got = 0
        while got < len(view):
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise _Timeout(got)
            self.connection.settimeout(left)
            try:
                n = self.rfile.readinto1(view[got:got + (1 << 20)])
            except (TimeoutError, socket.timeout):
                raise _Timeout(got) from None
            except OSError:
                n = 0
            if not n:
                if time.monotonic() >= self._deadline:  # the watchdog shut the reading side
                    raise _Timeout(got)
                break
            got += n
        return got

    def _discard(self, length: int) -> None:
        """Reads and drops a refused body (up to ``max(4 x limit, 64 MB)``, within the deadline), so that the
        client gets the answer rather than a broken pipe while it is still sending."""
        self.close_connection = True
        left = min(length, max(4 * self.server.owner.max_body_bytes, 64 << 20))
        scratch = memoryview(bytearray(min(left, 1 << 20)))
        try:
            while left > 0:
                n = self._read_into(scratch[:min(left, len(scratch))])
                if not n:
                    break
                left -= n
        except _Timeout:
            pass
        self._arrived()

    def _timed_out(self, got: int, length: int) -> None:
        self.close_connection = True
        timeout = self.server.owner.read_timeout
        self._arrived()
        self._reply(HTTPStatus.REQUEST_TIMEOUT,
                    {"error": f"the request body did not arrive within the server's read timeout of {timeout:g} s "
                              f"({got} of {length} bytes came); the connection is closed. Check the network, or "
                              f"start the server with a higher --read-timeout", "limit": "read_timeout",
                     "max": timeout})

    def _key_error(self) -> Optional[str]:
        """None when no key is required or the ``X-API-Key`` header matches, else what is wrong."""
        key = self.server.owner.api_key
        given = self.headers.get(API_KEY_HEADER, "")
        if key is None or hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
            return None
        return f"{'missing' if not given else 'wrong'} API key: send the server's key in the {API_KEY_HEADER} header"

    def do_GET(self) -> None:
        self._arrived()
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
            self._arrived()
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
            self._arrived()
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "send a Content-Length header"})
            return
        key_error = self._key_error()
        if key_error:
            self._discard(length)
            self._reply(HTTPStatus.UNAUTHORIZED, {"error": key_error})
            return
        if length > owner.max_body_bytes:
            self._discard(length)
            error = _too_large(f"the body is {length} bytes, over the server's limit of {owner.max_body_bytes}",
                               "max_body_bytes", length, owner.max_body_bytes,
                               "Send fewer images per request (lower batch_size)")
            self._reply(error.status, {"error": str(error), **error.extra})
            return
        body = bytearray(length)
        try:
            got = self._read_into(memoryview(body))
        except _Timeout as e:
            self._timed_out(e.args[0], length)
            return
        self._arrived()
        if got < length:
            self.close_connection = True
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"the body ended after {got} of {length} bytes"})
            return
        # At most two copies of the body at a time: the bytes and their text, then the text and the parsed JSON.
        try:
            text = _body_text(body, owner.max_json_values)
            del body
            encoded, prompts, metadata = _parse_request(text)
        except _BadRequest as e:
            self._reply(e.status, {"error": str(e), **e.extra})
            return
        del text
        status, payload = self._decode_and_score(encoded, prompts, metadata)
        self._reply(status, payload)

    def _decode_and_score(self, encoded: list, prompts: list[str], metadata: Optional[list]) -> tuple[int, dict]:
        owner = self.server.owner
        with owner._backend_lock:  # one request's pixels in memory at a time
            try:
                images = decode_png_batch(encoded, owner.limits)
            except ImageTooLarge as e:
                fix = ("Generate smaller images" if e.limit == "max_image_pixels"
                       else "Send fewer images per request (lower batch_size)")
                error = _too_large(str(e), e.limit, e.value, e.maximum, fix)
                return error.status, {"error": str(error), **error.extra}
            except ValueError as e:
                return HTTPStatus.BAD_REQUEST, {"error": str(e)}
            encoded.clear()  # the base64 text is no longer needed
            try:
                return HTTPStatus.OK, _score_in_chunks(owner.backend, images, prompts, metadata,
                                                       owner.score_chunk_pixels)
            except Exception as e:  # the backend's failure goes back to the client as text, never as a traceback
                return (HTTPStatus.INTERNAL_SERVER_ERROR,
                        {"error": f"reward {owner.backend.name!r} failed: {type(e).__name__}: {e}"})
            finally:
                del images


_BUSY_BODY = json.dumps({"error": "the reward server is busy (all its connections are in use); retry after a "
                                  "second, or start the server with a higher --max-concurrent",
                         "limit": "max_concurrent"}).encode("utf-8")
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode("ascii") + b"\r\n\r\n" + _BUSY_BODY)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on the connections served at once and a watchdog on request deadlines."""

    daemon_threads = True
    owner: "RewardServer"

    def __init__(self, address: tuple, owner: "RewardServer"):
        self.owner = owner
        self._slots = threading.BoundedSemaphore(owner.max_concurrent)
        self._refusers = threading.BoundedSemaphore(_MAX_REFUSERS)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def watch(self, connection: socket.socket, deadline: float) -> None:
        with self._deadlines_lock:
            self._deadlines[connection] = deadline

    def unwatch(self, connection: socket.socket) -> None:
        with self._deadlines_lock:
            self._deadlines.pop(connection, None)

    def service_actions(self) -> None:
        """Runs in the serving loop every poll interval: shuts the reading side of connections past their deadline
        (the handler's blocked read then returns at once, and the thread ends)."""
        now = time.monotonic()
        with self._deadlines_lock:
            late = [c for c, deadline in self._deadlines.items() if deadline <= now]
            for connection in late:
                del self._deadlines[connection]
        for connection in late:
            try:
                connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if self._slots.acquire(blocking=False):
            target, release = self._serve, self._slots.release
        elif self._refusers.acquire(blocking=False):
            target, release = self._refuse, self._refusers.release
        else:
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._run, args=(target, release, request, client_address), daemon=True,
                                  name="reward-server-connection")
        thread.start()

    def _run(self, target, release, request: socket.socket, client_address: Any) -> None:
        try:
            target(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.unwatch(request)
            self.shutdown_request(request)
            release()

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        self.finish_request(request, client_address)

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """503 and close; the request is drained briefly first and after, so the client reads the answer."""
        request.settimeout(_REFUSE_DRAIN_S)
        end = time.monotonic() + _REFUSE_DRAIN_S
        try:
            request.recv(65536)  # the request line and headers, when they come at once
        except OSError:  # nothing came within the drain time, or the client is gone: answer anyway
            pass
        try:
            request.sendall(_BUSY)
            request.shutdown(socket.SHUT_WR)
            while time.monotonic() < end and request.recv(65536):
                pass
        except OSError:
            pass


class RewardServer:
    """Serves ``backend`` over HTTP on ``host:port`` (port 0: a free port, read it from :attr:`url`).

    ``start()`` binds and serves from a background thread, ``stop()`` shuts down; also a context manager.
    ``api_key``: when set, requests without the matching ``X-API-Key`` header get 401; a host that is not a loopback
    address needs one, or ``allow_unauthenticated=True`` (:class:`UnsafeBindError` from :meth:`bind` otherwise).
    The limits are described in the module docstring. ``score_requests`` counts the ``POST /score`` requests
    received (whatever their outcome).
    """

    def __init__(self, backend: RewardBackend, host: str = "127.0.0.1", port: int = 0,
                 api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES, log_requests: bool = False, *,
                 allow_unauthenticated: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT, score_chunk_pixels: int = SCORE_CHUNK_PIXELS,
                 max_json_values: int = MAX_JSON_VALUES):
        if not read_timeout > 0:
            raise ValueError(f"read_timeout must be > 0 seconds, got {read_timeout}")
        for name, value in (("max_body_bytes", max_body_bytes), ("max_concurrent", max_concurrent),
                            ("score_chunk_pixels", score_chunk_pixels), ("max_json_values", max_json_values)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.backend = backend
        self.host = host
        self.port = int(port)
        self.api_key = api_key or None
        self.allow_unauthenticated = bool(allow_unauthenticated)
        self.max_body_bytes = int(max_body_bytes)
        self.limits = ImageLimits(int(max_image_pixels), int(max_request_pixels))
        self.read_timeout = float(read_timeout)
        self.max_concurrent = int(max_concurrent)
        self.score_chunk_pixels = int(score_chunk_pixels)
        self.max_json_values = int(max_json_values)
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

    def check_bind(self) -> None:
        """:func:`check_bind` of this server's settings."""
        check_bind(self.host, self.api_key, self.allow_unauthenticated)

    def bind(self) -> "RewardServer":
        """Binds the socket without serving yet (``url`` is then known); checks the host first (:meth:`check_bind`)."""
        if self._httpd is None:
            self.check_bind()
            self._httpd = _HTTPServer((self.host, self.port), self)
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
