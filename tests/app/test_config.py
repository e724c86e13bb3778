import pytest
from pydantic import ValidationError

from app.config import Settings


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
