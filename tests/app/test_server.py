"""The service as users start it: ``python -m app`` in its own process, over real HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(**env: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m app`` on a free port, ready."""
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


def test_python_m_app_serves_logs_json_and_stops_cleanly_on_sigterm() -> None:
    process, url = start()
    try:
        response = httpx.post(url + "/predict", json={"features": {"I1": 3, "C1": "05db9164"}})
        assert response.status_code == 200
        assert 0.0 < response.json()["probability"] < 1.0
        for _ in range(20):  # no log line per request
            httpx.post(url + "/predict", json={"features": {}})
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("serving deepfm-") for m in messages)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert len(lines) < 15, messages


def test_workers_serve_from_several_processes_and_stop_on_sigterm() -> None:
    process, url = start(CTR_WORKERS="2")
    try:
        with httpx.Client(base_url=url) as client:  # a connection goes to one worker
            for _ in range(5):
                response = client.post("/predict", json={"features": {"C1": "05db9164"}})
                assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    messages = [json.loads(line)["message"] for line in stderr.splitlines() if line.strip()]
    assert sum(m.startswith("serving deepfm-") for m in messages) == 2  # one per worker
