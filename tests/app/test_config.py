import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import ValidationError

from app.config import Settings, UnknownSetting
from tests.redis_servers import free_port
from tests.server_process import ROOT


def test_settings_come_from_ctr_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTR_BATCH_MAX", "64")
    monkeypatch.setenv("CTR_API_KEY", "s3cr3t-value")
    monkeypatch.setenv("CTR_MAX_BODY_BYTES", "1024")
    settings = Settings()
    assert settings.batch_max == 64 and settings.max_body_bytes == 1024
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(settings)


def test_defaults_follow_the_design() -> None:
    s = Settings()
    assert (s.redis_timeout_ms, s.local_cache_rows, s.batch_max) == (50, 1_000_000, 256)
    assert (s.max_instances, s.max_body_bytes, s.hold_tables) == (10_000, 8 << 20, True)
    assert s.store == "memory" and s.api_key is None
    assert s.model_dir.name == "default"


def test_store_is_redis_when_a_url_is_set() -> None:
    assert Settings(redis_url="redis://localhost:6379/0").store == "redis"
    assert Settings(redis_url="redis://x", embedding_store="memory").store == "memory"
    # Only a redis-store replica may go without the tables.
    assert not Settings(redis_url="redis://x", hold_tables=False).tables_in_process
    assert Settings(redis_url="redis://x").tables_in_process
    assert Settings(hold_tables=False).tables_in_process
    with pytest.raises(ValidationError, match="needs CTR_REDIS_URL"):
        Settings(embedding_store="redis")


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTR_BATCH_MAX", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_command_line_options_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTR_PORT", "9000")
    monkeypatch.setenv("CTR_BATCH_MAX", "8")
    settings = Settings.of_server(["--port", "9100", "--hold-tables", "false"])
    assert (settings.port, settings.batch_max, settings.hold_tables) == (9100, 8, False)


def test_an_unknown_ctr_variable_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTR_REDIS_ULR", "redis://x")
    with pytest.raises(UnknownSetting, match="CTR_REDIS_ULR"):
        Settings.of_server([])
    monkeypatch.delenv("CTR_REDIS_ULR")
    monkeypatch.setenv("ctr_port", "9001")  # any case, as pydantic-settings reads them
    assert Settings.of_server([]).port == 9001


def test_python_m_app_takes_its_options_and_refuses_typos() -> None:
    help_text = run_app("--help")
    assert help_text.returncode == 0
    for option in ["--port", "--model-dir", "--redis-url", "--workers", "--chunk-rows"]:
        assert option in help_text.stdout
    typo = run_app(env={"CTR_REDIS_ULR": "redis://x"})
    assert typo.returncode != 0 and "CTR_REDIS_ULR" in typo.stderr
    bad = run_app("--port", "abc")
    assert bad.returncode != 0 and "port" in bad.stderr
    assert "Traceback" not in typo.stderr + bad.stderr


def test_python_m_app_serves_on_the_port_it_is_given() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), "--log-level", "error"],
        cwd=ROOT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0


def run_app(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"log_sample_rate": 0.5}, "needs CTR_LOG_DIR or CTR_LOG_STREAM"),
        ({"log_sample_rate": 1.5, "log_dir": "/tmp"}, "less than or equal to 1"),
        ({"log_stream": "p"}, "CTR_LOG_STREAM needs CTR_REDIS_URL"),
    ],
)
def test_a_prediction_log_without_a_place_to_go_is_refused(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**settings)  # type: ignore[arg-type]
