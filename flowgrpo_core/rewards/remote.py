"""A reward computed by a reward server: :class:`RemoteReward` posts images to ``POST /score`` (see :mod:`.server`).

Wire protocol (JSON only, never pickle: unpickling runs code, and server URLs travel inside shared workflows):

* ``POST /score`` ``{"images": [base64 PNG], "prompts": [str], "metadata": [dict] | null}``
  -> ``{"scores": [float], "details": {name: [per-sample JSON value]}}``;
* ``GET /health`` -> ``{"status": "ok", "backend": name}``;
* optional API key in the ``X-API-Key`` header (401 when it does not match);
* errors: ``{"error": message}`` with 400 (bad request), 401 (API key), 408 (the request did not arrive within the
  server's read timeout), 413 (over a limit: the answer also names it, ``"limit"``, with the request's ``"value"`` and
  the ``"max"``), 500 (backend failure), 503 (the server is busy; ``Retry-After`` says when to retry).

Images travel as 8-bit RGB PNG, ``round(x * 255)`` of the first three channels, so a remote score equals the local
score of the 1/255-quantised image. Image tensors ``[H, W, C>=3]`` inside the metadata (an image-edit run's
``input_image``) travel the same way, as a base64 PNG string in their place (:func:`json_metadata`). The client only
touches the network inside :meth:`RemoteReward.score`.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence

import torch

from .base import RewardBackend, RewardResult
from .images import ImageLimits, decode_png_batch

__all__ = ["RemoteRewardError", "RemoteReward", "encode_images", "decode_images", "json_metadata", "API_KEY_HEADER"]

API_KEY_HEADER = "X-API-Key"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class RemoteRewardError(ValueError):
    """A reward server could not be reached or answered something unusable (the message names the URL and the fix)."""


def encode_images(images: torch.Tensor) -> list[str]:
    """``images`` ``[B, H, W, C>=3]`` in ``[0, 1]`` -> ``B`` base64 strings of 8-bit RGB PNGs (``round(x * 255)``)."""
    from PIL import Image

    if images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be [B, H, W, C>=3] in [0, 1], got shape {tuple(images.shape)}")
    pixels = (images[..., :3].detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_images(encoded: Sequence[str], limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """``B`` base64 PNG strings (all the same size) -> ``[B, H, W, 3]`` float32 in ``[0, 1]`` (``value / 255``).
    ValueError on anything that is not a decodable PNG or on mixed sizes, :class:`.images.ImageTooLarge` over
    ``limits`` (checked from the PNG headers before decoding; see :func:`.images.decode_png_batch`, which the server
    uses to keep the batch as uint8)."""
    return decode_png_batch(encoded, limits).float().div_(255.0)


def json_metadata(metadata: Optional[Sequence[Any]]) -> Optional[list]:
    """``metadata`` with every image tensor ``[H, W, C>=3]`` in it (an edit run's ``input_image``) replaced by a base64
    PNG string as the images travel (8-bit RGB; :func:`decode_images` reads it back); the same tensor is encoded
    once. Other values are left for ``json.dumps``."""
    if metadata is None:
        return None
    done: dict[int, str] = {}

    def value(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] >= 3:
            if id(v) not in done:
                done[id(v)] = encode_images(v[None])[0]
            return done[id(v)]
        return v

    return [{k: value(v) for k, v in m.items()} if isinstance(m, dict) else m for m in metadata]


class _Retryable(Exception):
    """A failure worth another attempt (connection error or HTTP 5xx); ``args[0]`` is the final message, ``args[1]``
    the fix, ``retry_after`` the seconds the server asked to wait (503), else 0."""

    def __init__(self, message: str, fix: str, retry_after: float = 0.0):
        super().__init__(message, fix)
        self.retry_after = retry_after


class RemoteReward(RewardBackend):
    """Scores images with a reward server (``POST {url}/score``), in requests of at most ``batch_size`` images.

    ``timeout``: seconds per request; ``retries``: extra attempts after a connection error or an HTTP 5xx, waiting
    ``backoff * 2**attempt`` seconds (at least what a 503's ``Retry-After`` asks; at most 10 s) in between (timeouts
    and 4xx answers are not retried);
    ``api_key``: sent as ``X-API-Key``.
    """

    def __init__(self, url: str, *, timeout: float = 120.0, retries: int = 2, backoff: float = 0.5,
                 api_key: Optional[str] = None, batch_size: int = 64, name: str = "remote",
                 needs_prompt: bool = True):
        base = url.strip().rstrip("/")
        if base.endswith("/score"):
            base = base[: -len("/score")]
        parsed = urllib.parse.urlsplit(base)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"reward server URL must look like http://127.0.0.1:8000, got {url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not 0 <= int(retries) <= 20:
            raise ValueError(f"retries must be between 0 and 20, got {retries}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = base
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = max(0.0, float(backoff))
        self.api_key = api_key or None
        self.batch_size = int(batch_size)
        self.name = name
        self.needs_prompt = needs_prompt
        # A loopback server must not be reached through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult:
        batch = images.shape[0]
        scores: list[float] = []
        details: dict[str, list] = {}
        for start in range(0, batch, self.batch_size):
            stop = min(start + self.batch_size, batch)
            meta = None if metadata is None else list(metadata[start:stop])
            chunk_scores, chunk_details = self._score_chunk(images[start:stop], prompts[start:stop], meta)
            for key in set(details) | set(chunk_details):  # a key missing from some chunks is padded with None
                values = details.setdefault(key, [None] * start)
                values.extend(chunk_details.get(key, [None] * (stop - start)))
            scores.extend(chunk_scores)
        return RewardResult(scores=torch.tensor(scores, dtype=torch.float32), details=details)

    # -- one request --------------------------------------------------------------------------------------------

    def _fail(self, what: str, fix: str) -> RemoteRewardError:
        return RemoteRewardError(f"reward server {self.url}/score: {what}. {fix}")

    def _score_chunk(self, images: torch.Tensor, prompts: list[str],
                     metadata: Optional[list]) -> tuple[list[float], dict[str, list]]:
        encoded = encode_images(images)
        try:
            body = json.dumps({"images": encoded, "prompts": prompts, "metadata": json_metadata(metadata)},
                              allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise self._fail(f"the metadata cannot be sent as JSON ({e})",
                             "Keep metadata to plain strings, numbers, lists and dicts.") from None
        reply = self._post(body)
        try:
            payload = json.loads(reply)
        except ValueError:
            raise self._fail(f"the answer is not JSON (starts with {reply[:80]!r})",
                             "Check that the URL points at a flowgrpo reward server.") from None
        return self._parse(payload, images.shape[0])

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers[API_KEY_HEADER] = self.api_key
        attempt = 0
        while True:
            request = urllib.request.Request(f"{self.url}/score", data=body, headers=headers, method="POST")
            try:
                return self._send(request)
            except _Retryable as e:
                if attempt >= self.retries:
                    raise self._fail(f"{e.args[0]} (after {attempt + 1} attempt{'s' * bool(attempt)})",
                                     e.args[1]) from None
                wait = max(self.backoff * 2 ** attempt, e.retry_after)
            time.sleep(min(10.0, wait))
            attempt += 1

    def _send(self, request: urllib.request.Request) -> bytes:
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, _error_text(e)
            if status == 503:
                raise _Retryable(f"HTTP 503, the server is busy ({text})",
                                 "Raise retries, or start the server with a higher --max-concurrent.",
                                 _retry_after(e)) from None
            if status >= 500:
                raise _Retryable(f"HTTP {status}, the reward backend failed: {text}",
                                 "See the reward server's log; fix the backend or its input.") from None
            if status == 401:
                raise self._fail(f"HTTP 401, the API key was refused ({text})",
                                 f"Set api_key to the key the server was started with (sent as {API_KEY_HEADER}).")
            if status == 413:
                raise self._fail(f"HTTP 413, the request is too large ({text})",
                                 "Generate smaller images, or raise the server's limit that the message names."
                                 if "--max-image-pixels" in text else
                                 "Lower batch_size so each request carries fewer images, or raise the server's "
                                 "limit that the message names.")
            if status == 408:
                raise self._fail(f"HTTP 408, the request did not reach the server in time ({text})",
                                 "Check the network, lower batch_size, or raise the server's --read-timeout.")
            raise self._fail(f"HTTP {status}: {text}",
                             "Check the URL and that client and server speak the same protocol.")
        except (TimeoutError, socket.timeout) as e:
            raise self._fail(f"no answer within {self.timeout:g} s ({e})",
                             "Raise timeout, lower batch_size, or check that the server is not stuck.") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise self._fail(f"no connection within {self.timeout:g} s",
                                 "Check the host and port, or raise timeout.") from None
            if isinstance(e.reason, ConnectionRefusedError):
                raise _Retryable(f"cannot connect, connection refused ({e.reason})", _START_SERVER) from None
            raise _Retryable(f"the connection failed ({e.reason})",
                             "Check the URL and the server's log; a body over the server's size limit can also "
                             "break the connection (lower batch_size).") from None
        except (ConnectionError, http.client.HTTPException) as e:  # refused, reset, closed without an answer
            raise _Retryable(f"the connection failed ({type(e).__name__}: {e})",
                             "Check the URL and the server's log.") from None

    def _parse(self, payload: Any, batch: int) -> tuple[list[float], dict[str, list]]:
        if not isinstance(payload, dict) or "scores" not in payload:
            raise self._fail("the answer is not a JSON object with 'scores'",
                             "Check that the URL points at a flowgrpo reward server.")
        scores = payload["scores"]
        if not isinstance(scores, list) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise self._fail("'scores' is not a list of numbers", "Fix the reward server's backend.")
        if len(scores) != batch:
            raise self._fail(f"it returned {len(scores)} scores for {batch} images", "Fix the reward server's backend.")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise self._fail(f"it returned NaN or infinite scores for samples {bad}",
                             "Fix the reward server's backend.")
        details = payload.get("details") or {}
        if not isinstance(details, dict) or not all(
                isinstance(v, list) and len(v) == batch for v in details.values()):
            raise self._fail(f"'details' is not an object of per-sample lists of length {batch}",
                             "Fix the reward server's backend.")
        return [float(s) for s in scores], {str(k): v for k, v in details.items()}


_START_SERVER = ("Start the server (python -m flowgrpo_core.rewards serve --backend NAME --port PORT) "
                 "or fix the URL.")


def _retry_after(error: urllib.error.HTTPError) -> float:
    """The seconds of a ``Retry-After`` header (0 when absent or a date)."""
    try:
        return max(0.0, float(error.headers.get("Retry-After", "0")))
    except (TypeError, ValueError, AttributeError):
        return 0.0


def _error_text(error: urllib.error.HTTPError) -> str:
    """The server's ``{"error": ...}`` message, else the start of the body, else the HTTP reason."""
    try:
        raw = error.read()
    except OSError:
        raw = b""
    try:
        message = json.loads(raw).get("error")
        if message:
            return str(message)
    except (ValueError, AttributeError):
        pass
    return raw[:300].decode("utf-8", "replace").strip() or str(error.reason)
