"""Settings, read from the environment (prefix ``CTR_``) in this one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
# The bundled model (model.default_model's recipe writes it there). Spelt out, not
# imported: importing the recipe would load the training stack into every process
# that reads settings, the container's healthcheck included.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


class Settings(BaseSettings):
    """Everything the service can be told; see README "Configuration"."""

    model_config = SettingsConfigDict(env_prefix="CTR_", extra="ignore", frozen=True)

    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="checkpoint directory to serve")
    embedding_store: Literal["memory", "redis"] | None = Field(
        None, description="memory, or redis (the default when redis_url is set)"
    )
    redis_url: SecretStr | None = Field(None, description="redis://, rediss:// or a cluster URL")
    redis_cluster: bool = Field(False, description="redis_url is a node of a Redis Cluster")
    redis_timeout_ms: PositiveInt = Field(
        50, description="time budget of one batch's Redis lookups; past it, the lower tiers"
    )
    redis_partitions: PositiveInt = Field(
        64, description="hashes per field when publishing rows (readers use the manifest's)"
    )
    local_cache_rows: PositiveInt = Field(
        1_000_000, description="embedding rows in the in-process LRU (redis store)"
    )
    hold_tables: bool = Field(
        True,
        description="redis store: also hold the checkpoint tables, for exact answers when "
        "Redis fails; false: the replica's memory does not grow with the vocabulary",
    )
    batch_max: PositiveInt = Field(256, description="most /predict calls in one forward pass")
    max_instances: PositiveInt = Field(10_000, description="most rows in one /predict_many")
    max_body_bytes: PositiveInt = 8 * MiB
    max_value_chars: PositiveInt = Field(
        256, description="longest sparse string value (422 past it)"
    )
    max_queued: PositiveInt = Field(
        2048, description="calls waiting for the forward pass; past it, 503 with Retry-After"
    )
    chunk_rows: PositiveInt = Field(4096, description="rows per forward pass in /predict_many")
    api_key: SecretStr | None = Field(None, description="when set, X-API-Key is required")
    torch_threads: PositiveInt | None = Field(
        None, description="torch intra-op threads; default: one per core but one"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    port: PositiveInt = 8000
    workers: PositiveInt = Field(
        1, description="server processes (python -m app); each loads its own model"
    )
    shutdown_timeout_s: PositiveInt = Field(
        30, description="on SIGTERM, how long in-flight calls may take before the exit"
    )

    @model_validator(mode="after")
    def _store_needs_redis(self) -> Settings:
        if self.embedding_store == "redis" and self.redis_url is None:
            raise ValueError("CTR_EMBEDDING_STORE=redis needs CTR_REDIS_URL")
        return self

    @property
    def tables_in_process(self) -> bool:
        """Whether this replica loads the checkpoint's tables and vocabularies."""
        return self.store == "memory" or self.hold_tables

    @property
    def store(self) -> Literal["memory", "redis"]:
        """The embedding store in use: as set, else redis exactly when a Redis URL is set."""
        if self.embedding_store is not None:
            return self.embedding_store
        return "redis" if self.redis_url is not None else "memory"
