"""Reward server and client (flowgrpo_core.rewards.server / .remote) over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

from flowgrpo_core.rewards import RewardBackend, RewardResult, SimpleReward
from flowgrpo_core.rewards.remote import RemoteReward, RemoteRewardError, decode_images, encode_images
from flowgrpo_core.rewards.server import RewardServer

REPO = Path(__file__).resolve().parents[2]


def _images(batch: int = 5, size: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.rand(batch, size, size, 4, generator=g) * 1.2 - 0.1  # 4 channels and out-of-range values too


def _quantised(images: torch.Tensor) -> torch.Tensor:
    """What the server sees: the 8-bit RGB PNG of each image."""
    return (images[..., :3].clamp(0, 1) * 255).round() / 255


class PromptEcho(RewardBackend):
    """Score = prompt length + metadata["bonus"]; details echo what the server received."""

    name = "prompt_echo"
    needs_prompt = True

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: Optional[Sequence[dict]]) -> RewardResult:
        bonus = [m["bonus"] for m in metadata] if metadata is not None else [0.0] * len(prompts)
        scores = torch.tensor([len(p) + b for p, b in zip(prompts, bonus)])
        return RewardResult(scores, {"prompt": list(prompts), "mean": images.mean(dim=(1, 2, 3))})


class Exploding(RewardBackend):
    name = "exploding"

    def __init__(self):
        self.calls = 0

    def _score(self, images, prompts, metadata):
        self.calls += 1
        raise RuntimeError("reward model ran out of memory")


def test_png_round_trip_is_the_8bit_quantisation():
    images = _images(3)
    torch.testing.assert_close(decode_images(encode_images(images)), _quantised(images), rtol=0, atol=0)


def test_remote_scores_equal_local_scores_of_the_quantised_images():
    images, prompts = _images(), [f"p{i}" for i in range(5)]
    backend = SimpleReward("brightness")
    with RewardServer(backend) as server:
        assert server.url.startswith("http://127.0.0.1:")
        result = RemoteReward(server.url, timeout=10).score(images, prompts)
        assert server.score_requests == 1
    expected = backend.score(_quantised(images), prompts).scores
    assert result.scores.dtype == torch.float32 and result.scores.shape == (5,)
    assert torch.equal(result.scores, expected)
    assert not torch.equal(result.scores, backend.score(images, prompts).scores), "quantisation is visible"


def test_batches_are_split_and_details_concatenated():
    images, prompts = _images(5), ["a", "bb", "ccc", "dddd", "eeeee"]
    metadata = [{"bonus": 10.0 * i} for i in range(5)]
    with RewardServer(PromptEcho()) as server:
        whole = RemoteReward(server.url, timeout=10, batch_size=64).score(images, prompts, metadata)
        assert server.score_requests == 1
        split = RemoteReward(server.url + "/score", timeout=10, batch_size=2).score(images, prompts, metadata)
        assert server.score_requests == 1 + 3
    assert torch.equal(split.scores, whole.scores)
    assert split.scores.tolist() == [len(p) + m["bonus"] for p, m in zip(prompts, metadata)]
    assert split.details["prompt"] == prompts == whole.details["prompt"]
    torch.testing.assert_close(torch.tensor(split.details["mean"]), _quantised(images).mean(dim=(1, 2, 3)))


def test_api_key():
    images, prompts = _images(2), ["x", "y"]
    with RewardServer(SimpleReward("redness"), api_key="s3cret") as server:
        for key, word in ((None, "missing"), ("wrong", "wrong")):
            before = server.score_requests
            with pytest.raises(RemoteRewardError, match="API key") as info:
                RemoteReward(server.url, api_key=key, retries=3, backoff=0.01).score(images, prompts)
            assert word in str(info.value) and server.url in str(info.value)
            assert server.score_requests == before + 1, "a 401 is not retried"
        scores = RemoteReward(server.url, api_key="s3cret").score(images, prompts).scores
    assert torch.equal(scores, SimpleReward("redness").score(_quantised(images), prompts).scores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_fails_after_bounded_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    client = RemoteReward(url, retries=2, backoff=0.01, timeout=5)
    with pytest.raises(RemoteRewardError) as info:
        client.score(_images(1), ["x"])
    message = str(info.value)
    assert url in message and "cannot connect" in message and "after 3 attempts" in message
    assert "serve" in message, "the error says how to start a server"


@contextmanager
def _fake_server(handler_body):
    """A bare ThreadingHTTPServer whose POST handler is ``handler_body(handler)``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            handler_body(self)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _answer(body: bytes, status: int = 200):
    def reply(handler):
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return reply


def test_timeout():
    release = threading.Event()

    def stall(handler):
        release.wait(30)
        _answer(b'{"scores": [0.0]}')(handler)

    try:
        with _fake_server(stall) as url:
            with pytest.raises(RemoteRewardError, match="no answer within 0.5 s") as info:
                RemoteReward(url, timeout=0.5, retries=3, backoff=0.01).score(_images(1), ["x"])
            assert url in str(info.value) and "timeout" in str(info.value)
    finally:
        release.set()


@pytest.mark.parametrize("body, expected", [
    (b"<html>gateway</html>", "not JSON"),
    (b'["scores"]', "not a JSON object"),
    (json.dumps({"scores": [1.0, 2.0]}).encode(), "2 scores for 3 images"),
    (json.dumps({"scores": [1.0, "high", 2.0]}).encode(), "not a list of numbers"),
    (b'{"scores": [1.0, NaN, 2.0]}', r"NaN or infinite scores for samples \[1\]"),
    (json.dumps({"scores": [1.0, 2.0, 3.0], "details": {"x": [1]}}).encode(), "per-sample lists"),
])
def test_malformed_answers(body, expected):
    with _fake_server(_answer(body)) as url:
        with pytest.raises(RemoteRewardError, match=expected) as info:
            RemoteReward(url, timeout=5).score(_images(3), ["a", "b", "c"])
        assert url in str(info.value)


def test_backend_failure_is_a_500_with_the_message_and_is_retried():
    backend = Exploding()
    with RewardServer(backend) as server:
        with pytest.raises(RemoteRewardError) as info:
            RemoteReward(server.url, retries=1, backoff=0.01).score(_images(2), ["a", "b"])
        assert server.score_requests == 2 and backend.calls == 2, "one retry after the 500"
    message = str(info.value)
    assert "HTTP 500" in message and "reward model ran out of memory" in message and "after 2 attempts" in message


def test_server_rejects_bad_requests_with_json_errors():
    import urllib.error
    import urllib.request

    def post(url, body: bytes, headers=None):
        request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5)
        return info.value.code, json.loads(info.value.read())["error"]

    with RewardServer(SimpleReward("brightness"), max_body_bytes=1000) as server:
        code, error = post(server.url + "/score", b"{not json")
        assert code == 400 and "not JSON" in error
        code, error = post(server.url + "/score", json.dumps({"images": ["AAAA"], "prompts": ["x"]}).encode())
        assert code == 400 and "PNG" in error
        one_image = json.dumps({"images": encode_images(_images(1)), "prompts": []}).encode()
        code, error = post(server.url + "/score", one_image)
        assert code == 400 and "prompts" in error
        code, error = post(server.url + "/score", b"x" * 2000)
        assert code == 413 and "limit" in error
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(server.url + "/health", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok", "backend": "brightness"}


def _serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "flowgrpo_core.rewards", "serve", *args, "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def _served(*args: str):
    """The URL of ``python -m flowgrpo_core.rewards serve ARGS`` once it prints its ``serving`` line."""
    proc = _serve(*args)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=120).strip()
        assert line.startswith(f"serving {args[1]} on http://127.0.0.1:"), (line, proc.poll())
        yield line.rsplit(" ", 1)[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_serve_command_line():
    with _served("--backend", "saturation") as url:
        images = _images(2)
        scores = RemoteReward(url, timeout=30).score(images, ["a", "b"]).scores
        assert torch.equal(scores, SimpleReward("saturation").score(_quantised(images), ["a", "b"]).scores)


def test_serve_command_line_model_backend_and_missing_weights(tmp_path):
    from rewardkit.hf_clip_tiny import build_tiny_pickscore

    from flowgrpo_core.rewards.registry import build_backend

    folder = build_tiny_pickscore(tmp_path / "models", name="my_pickscore")
    models_dir = str(folder.parent)
    images, prompts = _images(3), ["a red apple", "a cat", "text"]
    with _served("--backend", "pickscore", "--weights", "my_pickscore", "--models-dir", models_dir) as url:
        remote = RemoteReward(url, timeout=60).score(images, prompts).scores
    local = build_backend("pickscore", "my_pickscore", [models_dir]).score(_quantised(images), prompts).scores
    torch.testing.assert_close(remote, local, rtol=0, atol=1e-5)

    proc = _serve("--backend", "pickscore", "--models-dir", models_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and not out
    assert "needs the folder 'PickScore_v1'" in err and models_dir in err and "yuvalkirstain/PickScore_v1" in err


def test_too_large_request_is_a_clear_413_not_a_broken_pipe():
    images = torch.rand(2, 1024, 1024, 3, generator=torch.Generator().manual_seed(1))  # ~8 MB of base64 PNG
    with RewardServer(SimpleReward("brightness"), max_body_bytes=100_000) as server:
        with pytest.raises(RemoteRewardError, match="HTTP 413") as info:
            RemoteReward(server.url, retries=2, backoff=0.01).score(images, ["a", "b"])
        assert server.score_requests == 1, "a 413 is not retried"
    assert "batch_size" in str(info.value) and "100000" in str(info.value)


def test_client_checks_its_settings_without_touching_the_network():
    for bad in ("ftp://127.0.0.1:1", "127.0.0.1:8000", "http://"):
        with pytest.raises(ValueError, match="URL must look like"):
            RemoteReward(bad)
    with pytest.raises(ValueError, match="batch_size"):
        RemoteReward("http://127.0.0.1:1", batch_size=0)
    port = _free_port()
    client = RemoteReward(f"http://127.0.0.1:{port}/score/", retries=0)  # nothing listens: no error yet
    assert client.url == f"http://127.0.0.1:{port}"
    with pytest.raises(RemoteRewardError, match="metadata cannot be sent as JSON"):
        client.score(_images(1), ["x"], [{"latent": torch.zeros(1)}])
