"""A small headless client for a ComfyUI server: queue an API prompt, follow it on the websocket, read /history.

    client = ComfyClient("http://127.0.0.1:8188")
    entry = client.run(prompt, on_event=lambda kind, data: print(kind, data))

Events passed to ``on_event(type, data)`` are the JSON websocket messages of the prompt being waited for
(``execution_start``, ``executing``, ``progress``, ``executed``, ``execution_cached``, ...) and every broadcast
message without a ``prompt_id`` (custom events such as ``flowgrpo.metrics``, sent by nodes with ``send_sync``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Optional

import websocket  # websocket-client

__all__ = ["ComfyError", "ComfyClient", "EventCallback"]

EventCallback = Callable[[str, dict], None]


class ComfyError(RuntimeError):
    """A prompt was rejected, failed in a node, or was interrupted.

    kind:      ``"rejected"`` (validation), ``"execution"`` (a node raised), ``"interrupted"``, ``"connection"``,
               ``"status"`` (finished without success) or ``"error"``.
    node_id, node_type: the failing node, when known; details: the server's payload.
    """

    def __init__(self, message: str, *, kind: str = "error", node_id: Optional[str] = None,
                 node_type: Optional[str] = None, details: Any = None):
        super().__init__(message)
        self.kind, self.node_id, self.node_type, self.details = kind, node_id, node_type, details


def _format_node_errors(node_errors: dict, prompt: Optional[dict] = None) -> str:
    lines = []
    for node_id, err in (node_errors or {}).items():
        title = ((prompt or {}).get(node_id, {}).get("_meta") or {}).get("title")
        cls = err.get("class_type", "?")
        head = f"node {node_id} ({cls}{', ' + repr(title) if title and title != cls else ''})"
        for e in err.get("errors") or []:
            details = f": {e['details']}" if e.get("details") else ""
            lines.append(f"  {head}: {e.get('message', 'error')}{details}")
    return "\n".join(lines)


def _raise_failure(prompt_id: str, kind: str, data: dict) -> None:
    """Raise the ComfyError of an ``execution_error`` or ``execution_interrupted`` event; other events pass."""
    if kind == "execution_error":
        raise ComfyError(
            f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
            f"{data.get('exception_type')}: {data.get('exception_message')}",
            kind="execution", node_id=data.get("node_id"), node_type=data.get("node_type"), details=data)
    if kind == "execution_interrupted":
        raise ComfyError(f"prompt {prompt_id} was interrupted at node {data.get('node_id')} "
                         f"({data.get('node_type')})", kind="interrupted", node_id=data.get("node_id"),
                         node_type=data.get("node_type"), details=data)


class ComfyClient:
    def __init__(self, base_url: str, client_id: Optional[str] = None):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self._ws: Optional[websocket.WebSocket] = None
        #: problems the server reported for outputs it left out of the last queued prompt (it ran the others)
        self.skipped_outputs: str = ""

    # ------------------------------------------------------------------ http
    def _request(self, path: str, data: Optional[bytes] = None, timeout: float = 30.0) -> bytes:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError:
            raise
        except OSError as e:  # refused, unreachable, timed out
            raise ComfyError(f"cannot reach the ComfyUI server at {self.base_url} ({e}); is it running?",
                             kind="connection") from None

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, payload: Any, timeout: float = 30.0) -> Any:
        body = self._request(path, json.dumps(payload).encode(), timeout)
        return json.loads(body) if body else None

    def object_info(self, node_class: Optional[str] = None) -> dict:
        """``/object_info`` (every node class) or ``/object_info/<class>``."""
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """The bytes of a file the server serves (``/view``), e.g. an image a SaveImage node wrote."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request(f"/view?{query}")

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """POST /interrupt: stop ``prompt_id`` if it is the running prompt (any running prompt when None)."""
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def cancel(self, prompt_id: str) -> None:
        """Drop ``prompt_id`` from the queue if it is still pending, and interrupt it if it is running."""
        self.post_json("/queue", {"delete": [prompt_id]})
        self.interrupt(prompt_id)

    def is_queued(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is running or pending."""
        queue = self.get_json("/queue")
        items = (queue.get("queue_running") or []) + (queue.get("queue_pending") or [])
        return any(len(item) > 1 and item[1] == prompt_id for item in items)

    def finished_entry(self, prompt_id: str, timeout: float = 0.0) -> Optional[dict]:
        """The prompt's ``/history`` entry once it has finished (None before), raising the ComfyError that
        :meth:`wait` would have raised for an interrupted or failed prompt (its status messages keep the events).

        ComfyUI stores the entry just *after* it sends the prompt's last websocket event, so a caller that has
        seen that event passes a ``timeout`` (seconds) to poll until the entry is there."""
        deadline = time.monotonic() + timeout
        entry = self.history(prompt_id)
        while not entry and time.monotonic() < deadline:
            time.sleep(0.05)
            entry = self.history(prompt_id)
        for message in (entry.get("status") or {}).get("messages") or []:
            if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
                _raise_failure(prompt_id, message[0], message[1])
        return entry or None

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    # ------------------------------------------------------------------ websocket
    def connect(self, timeout: float = 10.0) -> None:
        """Open the websocket (before queueing, so no event of the prompt is missed)."""
        if self._ws is not None:
            return
        ws_url = self.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            self._ws = websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise ComfyError(f"cannot open the websocket of {self.base_url} ({e})", kind="connection") from None

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> "ComfyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ prompts
    def queue_prompt(self, api_prompt: dict, extra_data: Optional[dict] = None) -> str:
        """POST /prompt; returns the prompt id. A prompt the server rejects raises ComfyError (kind ``rejected``)
        listing every failing node with its id, class and message. When the server queues the prompt without some
        invalid outputs, their problems are in :attr:`skipped_outputs`."""
        self.connect()
        payload = {"prompt": api_prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            out = self.post_json("/prompt", payload)
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                raise ComfyError(f"prompt rejected (HTTP {e.code}): {raw}", kind="rejected") from None
            error = body.get("error") or {}
            message = error.get("message", "prompt rejected") if isinstance(error, dict) else str(error)
            if isinstance(error, dict) and error.get("details"):
                message += f": {error['details']}"
            listed = _format_node_errors(body.get("node_errors") or {}, api_prompt)
            first = next(iter(body.get("node_errors") or {}), None)
            raise ComfyError(f"prompt rejected (HTTP {e.code}): {message}" + (f"\n{listed}" if listed else ""),
                             kind="rejected", node_id=first, details=body,
                             node_type=(body.get("node_errors") or {}).get(first, {}).get("class_type")) from None
        self.skipped_outputs = _format_node_errors(out.get("node_errors") or {}, api_prompt)
        return out["prompt_id"]

    def wait(self, prompt_id: str, timeout: Optional[float] = 120.0,
             on_event: Optional[EventCallback] = None) -> dict:
        """Read websocket events until ``prompt_id`` finishes; return its ``/history`` entry.

        ``on_event(type, data)`` sees the prompt's events and broadcast custom events (see the module docstring).
        Raises ComfyError with the failing node's id, class and message on ``execution_error``, ComfyError (kind
        ``interrupted``) on ``execution_interrupted``, and TimeoutError after ``timeout`` seconds (None: no limit).
        """
        self.connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            self._ws.settimeout(1.0 if left is None else min(left, 1.0))
            try:
                frame = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError) as e:
                self._ws = None
                raise ComfyError(f"lost the connection to {self.base_url} while prompt {prompt_id} ran ({e}); "
                                 "did the server stop?", kind="connection") from None
            except BaseException:  # e.g. Ctrl-C: the frame may be half read, so this socket is unusable now
                self.close()
                raise
            if not isinstance(frame, str):  # binary: previews, progress text
                continue
            msg = json.loads(frame)
            kind, data = msg.get("type"), msg.get("data") or {}
            if not isinstance(data, dict):
                continue
            if data.get("prompt_id", prompt_id) != prompt_id:
                continue
            if on_event is not None:
                on_event(kind, data)
            if "prompt_id" not in data:
                continue
            _raise_failure(prompt_id, kind, data)
            if kind == "executing" and data.get("node") is None:
                break
        return self.history(prompt_id)

    def run(self, api_prompt: dict, timeout: Optional[float] = 120.0, on_event: Optional[EventCallback] = None,
            extra_data: Optional[dict] = None) -> dict:
        """Queue and wait; raise unless /history reports success."""
        prompt_id = self.queue_prompt(api_prompt, extra_data)
        entry = self.wait(prompt_id, timeout, on_event)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise ComfyError(f"prompt {prompt_id} finished with status {status}", kind="status", details=entry)
        return entry
