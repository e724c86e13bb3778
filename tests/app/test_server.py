"""The service as users start it: ``python -m app`` in its own process, over real HTTP."""

import json
import signal

import httpx

from tests.server_process import start


def test_python_m_app_serves_logs_json_and_stops_cleanly_on_sigterm() -> None:
    process, url = start(CTR_WORKERS="1")
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
    assert sum(m.startswith("serving deepfm-") for m in messages) == 3  # supervisor, workers
