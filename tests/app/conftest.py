"""The app under test: the real app factory, its lifespan, and an httpx client over ASGI."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.config import Settings
from app.main import create_app
from model.checkpoint import Checkpoint, load_checkpoint
from model.default_model import DEFAULT_MODEL_DIR
from model.predict import Predictor
from tests.redis_servers import RedisServer
from tests.server_process import start

TEST_REDIS_BUDGET_MS = 2000
# Start-up and shutdown in a test: asgi-lifespan's default of 5 s is a timed assert
# that a loaded CI machine failed twice (a shutdown with Redis down); a hang still fails.
LIFESPAN_TIMEOUT_S = 60.0
Client = httpx.AsyncClient
ClientFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def lifespan(app: Any) -> LifespanManager:
    """The app's lifespan (start-up, then shutdown) around a test's calls."""
    return LifespanManager(app, LIFESPAN_TIMEOUT_S, LIFESPAN_TIMEOUT_S)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def default_checkpoint() -> Checkpoint:
    return load_checkpoint(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def offline(default_checkpoint: Checkpoint) -> Predictor:
    """The offline model code (model/), the reference for every served probability."""
    return Predictor(default_checkpoint)


@asynccontextmanager
async def serve(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    # A generous Redis budget unless a test sets one: on a loaded machine a batch's
    # lookups can take longer than the 50 ms default, and a test about exact answers
    # must not turn on the scheduler (the tests about time-outs set their budget).
    defaults = {"model_dir": DEFAULT_MODEL_DIR, "redis_timeout_ms": TEST_REDIS_BUDGET_MS}
    settings = Settings(**{**defaults, **overrides})
    app = create_app(settings)
    async with lifespan(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ctr") as client:
            yield client


@pytest.fixture
def make_client() -> ClientFactory:
    """Start the app with some settings changed: ``async with make_client(api_key=...)``."""
    return serve


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with serve() as c:
        yield c


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, on a free loopback port; the test may kill or pause it."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """``python -m app`` in its own process for a module's tests; it must exit 0."""
    process, url = start(CTR_LOG_LEVEL="error")
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        assert process.returncode == 0
