"""What one request can cost the reward server (issue 16): pixel limits checked from the PNG headers before decoding
(413), bounded peak memory, a read timeout per request, bounded concurrency (503) and no unauthenticated bind beyond
loopback. Traffic only ever goes to 127.0.0.1; 0.0.0.0 is only bound (or refused), never sent anything."""

from __future__ import annotations

import base64
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flowgrpo_core.rewards import SimpleReward
from flowgrpo_core.rewards.images import ImageLimits, ImageTooLarge, decode_png_batch, parse_pixels, png_size
from flowgrpo_core.rewards.remote import RemoteReward, RemoteRewardError
from flowgrpo_core.rewards.server import RewardServer, UnsafeBindError, is_loopback

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _bilevel_png(width: int, height: int) -> bytes:
    """A white 1-bit greyscale PNG, written row by row so the test never holds its pixels: 8000 x 8000 is 17 KB on
    the wire and 64 M pixels (192 MB as uint8 RGB, 768 MB as float32) once decoded."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter type 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _body(png: bytes, count: int) -> bytes:
    text = base64.b64encode(png).decode("ascii")
    return json.dumps({"images": [text] * count, "prompts": [""] * count, "metadata": None}).encode()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of ``POST url/score``."""
    request = urllib.request.Request(url + "/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


# -- the decoder ----------------------------------------------------------------------------------------------------

def test_sizes_are_checked_from_the_header_before_decoding():
    bomb = _bilevel_png(8000, 8000)
    assert len(bomb) < 20_000 and png_size(bomb) == (8000, 8000)
    encoded = [base64.b64encode(bomb).decode()] * 8
    with pytest.raises(ImageTooLarge, match=r"images\[0\] is 8000x8000 = 64000000 pixels.*max_image_pixels") as info:
        decode_png_batch(encoded)  # the defaults: 4096 x 4096 per image
    assert (info.value.limit, info.value.value, info.value.maximum) == ("max_image_pixels", 64_000_000, 4096 * 4096)
    with pytest.raises(ImageTooLarge, match="8 images of 8000x8000 = 512000000 pixels") as info:
        decode_png_batch(encoded, ImageLimits(max_image_pixels=10 ** 8, max_request_pixels=10 ** 8))
    assert info.value.limit == "max_request_pixels"

    small = base64.b64encode(_bilevel_png(40, 30)).decode()
    images = decode_png_batch([small] * 3, ImageLimits(max_image_pixels=1200, max_request_pixels=3600))
    assert images.dtype == torch.uint8 and images.shape == (3, 30, 40, 3) and bool((images == 255).all())
    with pytest.raises(ValueError, match="not a base64-encoded PNG"):
        decode_png_batch([base64.b64encode(b"GIF89a" + bytes(40)).decode()])
    truncated = base64.b64encode(_bilevel_png(40, 30)[:45]).decode()  # IHDR whole, IDAT cut
    with pytest.raises(ValueError, match=r"images\[1\] is not a decodable PNG"):
        decode_png_batch([small, truncated])
    assert parse_pixels("4096x4096") == 4096 * 4096 and parse_pixels("1000") == 1000
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_pixels("big")


# -- 413s from the running server -------------------------------------------------------------------------------------

def test_server_413s_name_the_limit_and_how_to_raise_it():
    with RewardServer(SimpleReward("brightness")) as server:  # the shipped defaults
        status, answer, _ = _post(server.url, _body(_bilevel_png(8000, 8000), 8))
        assert status == 413, answer
        assert answer["limit"] == "max_image_pixels" and answer["value"] == 64_000_000
        assert answer["max"] == 4096 * 4096 and "--max-image-pixels" in answer["error"]
        status, answer, _ = _post(server.url, _body(_bilevel_png(4096, 4096), 64))
        assert status == 413 and answer["limit"] == "max_request_pixels", answer
        assert "--max-request-pixels" in answer["error"] and "batch_size" in answer["error"]
        status, answer, _ = _post(server.url, b"[" + b"{}," * 1_000_000 + b"{}]")
        assert status == 413 and answer["limit"] == "max_json_values", answer
        status, answer, _ = _post(server.url, _body(_bilevel_png(64, 64), 2))
        assert status == 200 and answer["scores"] == [1.0, 1.0]

    with RewardServer(SimpleReward("brightness"), max_image_pixels=1000) as server:
        with pytest.raises(RemoteRewardError, match="HTTP 413") as info:
            RemoteReward(server.url, retries=2, backoff=0.01).score(torch.ones(2, 40, 40, 3), ["a", "b"])
        assert server.score_requests == 1, "a 413 is not retried"
        assert "--max-image-pixels" in str(info.value) and "smaller images" in str(info.value)


def test_chunked_scoring_equals_whole_batch_scoring():
    images = torch.rand(5, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    quantised = (images * 255).round() / 255
    with RewardServer(SimpleReward("saturation"), score_chunk_pixels=2 * 16 * 16) as server:  # 3 chunks: 2, 2, 1
        scores = RemoteReward(server.url, timeout=10).score(images, [""] * 5).scores
    assert torch.equal(scores, SimpleReward("saturation").score(quantised, [""] * 5).scores)


# -- peak memory of the real serve command ----------------------------------------------------------------------------

def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


@contextmanager
def _serve(*args: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "flowgrpo_core.rewards", "serve", "--port", "0", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=120).strip()
        assert line.startswith("serving ") and " on http://127.0.0.1:" in line, (line, proc.poll())
        yield proc, line.rsplit(" ", 1)[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM, clear_refs)")
def test_peak_memory_of_compressed_large_images_stays_within_the_limits():
    """The server's peak resident memory (VmHWM, reset before each request) grows by at most a bound derived from
    its limits. Without them, the first request (under 200 KB on the wire) would decode 8 x 64 M pixels: 1.5 GB as
    uint8, 6 GB as float32."""
    image_limit, request_limit, chunk = 2048 * 2048, 4 * 2048 * 2048, 2048 * 2048
    with _serve("--backend", "brightness", "--max-image-pixels", "2048x2048", "--max-request-pixels",
                str(request_limit), "--score-chunk-pixels", str(chunk)) as (proc, url):
        status, answer, _ = _post(url, _body(_bilevel_png(64, 64), 2))  # warm-up: imports, first thread
        assert status == 200, answer

        def peak_growth(body: bytes) -> tuple[int, dict]:
            _reset_peak(proc.pid)
            before = _memory(proc.pid)["VmRSS"]
            status, answer, _ = _post(url, body)
            return _memory(proc.pid)["VmHWM"] - before, {"status": status, **answer}

        refused_bound = 32 * MiB  # the bodies are under 1 MB; nothing is decoded
        for body, limit in ((_body(_bilevel_png(8000, 8000), 8), "max_image_pixels"),
                            (_body(_bilevel_png(2048, 2048), 64), "max_request_pixels")):
            assert len(body) < 1_000_000
            growth, answer = peak_growth(body)
            assert answer["status"] == 413 and answer["limit"] == limit, answer
            assert growth < refused_bound, f"peak grew {growth / MiB:.1f} MiB for a refused request"

        # At the limit: the uint8 batch (3 B/pixel), one float32 chunk and the backend's one float copy of it
        # (2 x 12 B/pixel), one image being decoded (12 B/pixel: Pillow's frame, its RGB conversion, the array),
        # and 64 MiB for everything else.
        accepted_bound = 3 * request_limit + 2 * 12 * chunk + 12 * image_limit + 64 * MiB
        growth, answer = peak_growth(_body(_bilevel_png(2048, 2048), 4))
        assert answer["status"] == 200 and answer["scores"] == [1.0] * 4, answer
        assert growth < accepted_bound, f"peak grew {growth / MiB:.1f} MiB, bound {accepted_bound / MiB:.0f} MiB"
        assert growth > 3 * request_limit // 2, "the measurement sees the decoded batch"


# -- read timeout ------------------------------------------------------------------------------------------------------

def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed ``sock`` within ``seconds``, what it sent before closing)."""
    received, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return True, received
        if not data:
            return True, received
        received += data
    return False, received


def test_stalled_upload_is_cut_off_by_the_read_timeout():
    with RewardServer(SimpleReward("brightness"), read_timeout=0.5) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
            stalled.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100000\r\n\r\n{\"images\": [")
            start = time.monotonic()
            closed, answer = _closed_within(stalled, 10)
            elapsed = time.monotonic() - start
        assert closed, "the stalled upload still holds its connection after 10 s"
        assert 0.4 < elapsed < 5, elapsed
        assert answer.startswith(b"HTTP/1.0 408"), answer[:200]
        assert b"read timeout of 0.5 s" in answer and b"--read-timeout" in answer

        # A client trickling its headers (a byte every 0.1 s: no single read ever waits 0.5 s) is cut off as well.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as trickle:
            start, closed = time.monotonic(), False
            for byte in b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200:
                try:
                    trickle.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                closed, _ = _closed_within(trickle, 0.1)
                if closed:
                    break
            elapsed = time.monotonic() - start
        assert closed and elapsed < 5, f"the trickling client was not cut off ({elapsed:.1f} s)"

        scores = RemoteReward(server.url, timeout=10, retries=0).score(torch.ones(1, 8, 8, 3), ["x"]).scores
        assert scores.tolist() == [1.0], "the server still answers"


# -- bounded concurrency -----------------------------------------------------------------------------------------------

def test_connections_beyond_max_concurrent_get_503_with_retry_after():
    with RewardServer(SimpleReward("brightness"), max_concurrent=2, read_timeout=30) as server:
        port = int(server.url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"POST /score HTTP/1.1\r\n")  # both slots now wait for the rest of a request
            status, answer, headers = _post(server.url, _body(_bilevel_png(8, 8), 1), timeout=10)
            assert status == 503 and headers.get("Retry-After") == "1", (status, answer)
            assert answer["limit"] == "max_concurrent" and "--max-concurrent" in answer["error"]
            with pytest.raises(RemoteRewardError, match="HTTP 503, the server is busy") as info:
                RemoteReward(server.url, retries=0).score(torch.ones(1, 8, 8, 3), ["x"])
            assert "--max-concurrent" in str(info.value)
            held[0].close()
            # A slot is free again once a held connection closes; the client waits Retry-After between attempts.
            scores = RemoteReward(server.url, timeout=10, retries=3).score(torch.ones(1, 8, 8, 3), ["x"]).scores
            assert scores.tolist() == [1.0]
        finally:
            for sock in held:
                sock.close()


# -- binding beyond loopback -------------------------------------------------------------------------------------------

def test_binding_beyond_loopback_needs_an_api_key_or_the_opt_out():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("::")

    server = RewardServer(SimpleReward("brightness"), host="0.0.0.0")
    with pytest.raises(UnsafeBindError) as info:
        server.bind()
    message = str(info.value)
    assert "0.0.0.0" in message and "--api-key" in message and "--allow-unauthenticated" in message
    with pytest.raises(RuntimeError, match="not started"):
        server.url  # nothing was bound

    # With a key, or the explicit opt-out, it binds (and is closed at once: no traffic goes to 0.0.0.0).
    for options in ({"api_key": "s3cret"}, {"allow_unauthenticated": True}):
        server = RewardServer(SimpleReward("brightness"), host="0.0.0.0", **options).bind()
        try:
            assert server.url.startswith("http://0.0.0.0:")
        finally:
            server.stop()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("FLOWGRPO_REWARD_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "flowgrpo_core.rewards", "serve", "--backend", "brightness",
                           "--host", "0.0.0.0", "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and not proc.stdout
    assert "Refusing to serve on 0.0.0.0 without an API key" in proc.stderr and "--api-key" in proc.stderr
    assert "Traceback" not in proc.stderr
