"""The web UI under a real uvicorn on a free port, and an httpx client that carries its token."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from tunesmith.ui.app import create_app
from tunesmith.ui.guard import TOKEN_HEADER

TOKEN = "test-token-0123456789"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class UI:
    url: str
    port: int
    runs: Path
    token: str | None

    def client(self, **options) -> httpx.Client:
        """An httpx client with the token, as the page sends it (no token: pass ``headers={}``)."""
        headers = options.pop("headers", {TOKEN_HEADER: self.token} if self.token else {})
        return httpx.Client(base_url=self.url, headers=headers, timeout=options.pop("timeout", 120), **options)


@contextlib.contextmanager
def ui_server(runs: Path, token: str | None = TOKEN, host: str = "127.0.0.1", **options):
    """``create_app(runs, token=..., host=..., **options)`` served by uvicorn in a thread until the block ends."""
    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(create_app(runs, token=token, host=host, **options), host=host, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        shown = f"[{host}]" if ":" in host else host
        yield UI(f"http://{shown}:{port}", port, Path(runs), token)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def ui(tmp_path):
    with ui_server(tmp_path / "runs") as served:
        yield served


@pytest.fixture
def client(ui):
    with ui.client() as client:
        yield client
