"""``python -m app`` in a process of its own, as users start it, for tests over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.redis_servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def start(**env: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m app`` on a free port, ready; its stderr is piped (JSON log lines)."""
    port = free_port()
    env = {**os.environ, "CTR_PORT": str(port), "CTR_LOG_LEVEL": "info", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            assert process.poll() is None, "the server exited during start-up"
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
