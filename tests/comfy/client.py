"""A small headless client for a ComfyUI server: queue an API-format prompt, wait on the websocket, read /history."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Optional

import websocket  # websocket-client


class ComfyError(RuntimeError):
    """A prompt was rejected, failed in a node, or was interrupted."""


class ComfyClient:
    def __init__(self, base_url: str, client_id: Optional[str] = None):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self._ws: Optional[websocket.WebSocket] = None

    # ------------------------------------------------------------------ http
    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, payload: Any, timeout: float = 30.0) -> Any:
        req = urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    # ------------------------------------------------------------------ websocket
    def connect(self, timeout: float = 10.0) -> None:
        """Open the websocket (before queueing, so no event of the prompt is missed)."""
        if self._ws is not None:
            return
        ws_url = self.base_url.replace("http://", "ws://").replace("https://", "wss://")
        self._ws = websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=timeout)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    # ------------------------------------------------------------------ prompts
    def queue_prompt(self, api_prompt: dict) -> str:
        """POST /prompt; returns the prompt id. A prompt that fails validation raises ComfyError with node errors."""
        self.connect()
        try:
            out = self.post_json("/prompt", {"prompt": api_prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyError(f"prompt rejected (HTTP {e.code}): {detail}") from None
        if out.get("node_errors"):
            raise ComfyError(f"prompt has node errors: {json.dumps(out['node_errors'])}")
        return out["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Read websocket events until ``prompt_id`` finishes; return its ``/history`` entry.

        Raises ComfyError with the failing node's id, type and message on ``execution_error`` or
        ``execution_interrupted``, and TimeoutError when nothing finishes within ``timeout`` seconds.
        """
        self.connect()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            self._ws.settimeout(left)
            try:
                frame = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not isinstance(frame, str):  # binary: previews, progress text
                continue
            msg = json.loads(frame)
            kind, data = msg.get("type"), msg.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if kind == "execution_error":
                raise ComfyError(
                    f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
            if kind == "execution_interrupted":
                raise ComfyError(f"prompt {prompt_id} was interrupted at node {data.get('node_id')}")
            if kind == "executing" and data.get("node") is None:
                break
        return self.history(prompt_id)

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def run(self, api_prompt: dict, timeout: float = 120.0) -> dict:
        """Queue and wait; raise unless /history reports success."""
        prompt_id = self.queue_prompt(api_prompt)
        entry = self.wait(prompt_id, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise ComfyError(f"prompt {prompt_id} finished with status {status}")
        return entry
