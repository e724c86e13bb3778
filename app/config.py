"""Settings, read from the environment (prefix ``CTR_``) and the command line in this one
place."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.cpus import available_cpus

MiB = 1 << 20
# The bundled model (model.default_model's recipe writes it there). Spelt out, not
# imported: importing the recipe would load the training stack into every process
# that reads settings, the container's healthcheck included.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


PROGRAM = "python -m app"
PREFIX = "CTR_"


class UnknownSetting(ValueError):
    """A CTR_* environment variable that names no setting (a typo, a removed setting)."""


class Settings(BaseSettings):
    """ctr-serve: click probabilities from a DeepFM over HTTP. Every option is also an
    environment variable, CTR_ and its name (--model-dir: CTR_MODEL_DIR); an option
    given on the command line wins. README "Configuration" explains them."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        extra="ignore",
        frozen=True,
        cli_kebab_case=True,
        cli_implicit_flags=False,
        cli_prog_name=PROGRAM,
    )

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
    id_cache_keys: NonNegativeInt = Field(
        262_144,
        description="memory store: lookup keys whose vocabulary ids are cached in-process "
        "(emptied when full); 0: none",
    )
    hold_tables: bool = Field(
        True,
        description="redis store: also hold the checkpoint tables, for exact answers when "
        "Redis fails; false: the replica's memory does not grow with the vocabulary",
    )
    follow_updates: bool = Field(
        True,
        description="with redis_url set (either store): apply the streamed updates of the "
        "base version served (python -m app.publish --update), without a reload",
    )
    batch_max: PositiveInt = Field(256, description="most /predict calls in one forward pass")
    max_instances: PositiveInt = Field(10_000, description="most rows in one /predict_many")
    max_body_bytes: PositiveInt = 8 * MiB
    max_queued: PositiveInt = Field(
        2048, description="calls waiting for the forward pass; past it, 503 with Retry-After"
    )
    chunk_rows: PositiveInt = Field(
        1024,
        description="most rows in one forward pass: a bigger call is scored in chunks of "
        "this many, taking turns with the other calls",
    )
    max_queued_rows: PositiveInt = Field(
        50_000,
        description="rows of the calls accepted and not yet answered; past it, 503 with "
        "Retry-After (a call is always accepted into an empty queue)",
    )
    api_key: SecretStr | None = Field(None, description="when set, X-API-Key is required")
    admin_endpoints: bool = Field(
        False,
        description="answer /admin/* without an API key (only on a network you trust); "
        "with CTR_API_KEY set they are on, behind the key",
    )
    models_root: Path | None = Field(
        None,
        description="the folder a reload's model_dir must lie in; default: the folder "
        "holding CTR_MODEL_DIR",
    )
    torch_threads: PositiveInt | None = Field(
        None,
        description="torch intra-op threads per worker; default: 1 with several workers, "
        "else one per CPU but one",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    port: PositiveInt = 8000
    workers: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="worker processes (python -m app); auto: one per CPU this process may "
        "use (affinity and cgroup quota). They share one copy of the model",
    )
    reload_timeout_s: PositiveInt = Field(
        120,
        description="with several workers: how long a reload waits for each to load the new "
        "model; one that takes longer is replaced by one serving it",
    )
    metrics_dir: Path | None = Field(
        None,
        description="with several workers: the folder of their metric files (emptied at "
        "start); default: a temporary folder removed at exit",
    )
    shutdown_timeout_s: PositiveInt = Field(
        30, description="on SIGTERM, how long in-flight calls may take before the exit"
    )
    log_sample_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="the share of calls whose rows go to the prediction log (0: off); needs "
        "a sink, log_dir or log_stream",
    )
    log_dir: Path | None = Field(
        None, description="prediction log sink: JSON-lines files in this folder, one a process"
    )
    log_max_bytes: PositiveInt = Field(
        64 * MiB, description="a prediction log file is rotated past this size"
    )
    log_backups: int = Field(5, ge=0, description="rotated prediction log files kept")
    log_stream: str | None = Field(
        None, description="prediction log sink: this Redis stream key, on CTR_REDIS_URL"
    )
    log_stream_maxlen: PositiveInt = Field(
        1_000_000, description="the prediction log stream is trimmed near this many records"
    )
    log_queue_rows: PositiveInt = Field(
        100_000,
        description="rows waiting for each prediction log sink; past it, records are dropped "
        "(and counted), never a request delayed",
    )

    @classmethod
    def of_server(cls, argv: Sequence[str] | None = None) -> Settings:
        """The settings of a server: the environment, overridden by the command-line
        options ``argv`` (``--help`` lists them). A CTR_ variable that names no setting
        raises UnknownSetting, naming it: a typo must not pass unnoticed."""
        unknown = sorted(
            name
            for name in os.environ
            if name.upper().startswith(PREFIX)
            and name[len(PREFIX) :].lower() not in cls.model_fields
        )
        if unknown:
            raise UnknownSetting(
                f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                f"`{PROGRAM} --help` lists them"
            )
        if argv is None:
            return cls()
        return cls(_cli_parse_args=list(argv))

    @model_validator(mode="after")
    def _queue_holds_the_largest_call(self) -> Settings:
        if self.max_queued_rows < self.max_instances:
            raise ValueError(
                f"max_queued_rows ({self.max_queued_rows}) must hold the largest call "
                f"(max_instances, {self.max_instances})"
            )
        return self

    @model_validator(mode="after")
    def _store_needs_redis(self) -> Settings:
        if self.embedding_store == "redis" and self.redis_url is None:
            raise ValueError("CTR_EMBEDDING_STORE=redis needs CTR_REDIS_URL")
        return self

    @model_validator(mode="after")
    def _log_needs_a_sink(self) -> Settings:
        if self.log_sample_rate > 0 and self.log_dir is None and self.log_stream is None:
            raise ValueError("CTR_LOG_SAMPLE_RATE needs CTR_LOG_DIR or CTR_LOG_STREAM")
        if self.log_stream is not None and self.redis_url is None:
            raise ValueError("CTR_LOG_STREAM needs CTR_REDIS_URL")
        return self

    @property
    def admin_enabled(self) -> bool:
        """Whether /admin/* may act: behind the API key, or switched on explicitly."""
        return self.api_key is not None or self.admin_endpoints

    @cached_property
    def worker_count(self) -> int:
        """The worker processes to run: as set, else one per CPU available."""
        return available_cpus() if self.workers == "auto" else self.workers

    @cached_property
    def threads_per_worker(self) -> int:
        """Torch intra-op threads in each worker: as set; else 1 with several workers
        (they use the cores), else every CPU available but one (the event loop's)."""
        if self.torch_threads is not None:
            return self.torch_threads
        return 1 if self.worker_count > 1 else max(1, available_cpus() - 1)

    @property
    def reload_root(self) -> Path:
        """The folder whose checkpoints a reload may load (symlinks resolved)."""
        return (self.models_root or self.model_dir.resolve().parent).resolve()

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
