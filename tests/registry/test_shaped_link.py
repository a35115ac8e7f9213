"""The link emulator used by bench/pull_vs_full.py: bytes intact, counted, and paced."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
import urllib.request

import pytest

from registry.local_servers import shaped_link

PAYLOAD = os.urandom(600_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


def _fetch(url: str) -> tuple[bytes, float]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        data = resp.read()
    return data, time.perf_counter() - t


def test_link_carries_bytes_intact_and_counts_them(origin):
    with shaped_link(origin) as link:
        data, _ = _fetch(link.url)
    assert hashlib.sha256(data).digest() == hashlib.sha256(PAYLOAD).digest()
    assert link.stats.to_client >= len(PAYLOAD)  # body + HTTP headers
    assert 0 < link.stats.to_server < 1000  # one GET request


def test_link_never_beats_its_rate_or_round_trip(origin):
    # Lower bounds only: a loaded machine can make it slower, never faster.
    with shaped_link(origin, mbit=24, rtt_ms=100) as link:
        data, seconds = _fetch(link.url)
        assert data == PAYLOAD
        assert seconds >= 0.9 * len(PAYLOAD) * 8 / 24e6 + 0.1  # 0.2 s on the wire + 1 RTT
        link.shape(None, 0.0)
        data, fast = _fetch(link.url)
    assert data == PAYLOAD and fast < seconds


def test_bad_shape_is_refused(origin):
    with shaped_link(origin) as link:
        with pytest.raises(ValueError, match="mbit"):
            link.shape(0)
        with pytest.raises(ValueError, match="rtt_ms"):
            link.shape(10, -1)
