"""uvicorn, run the way the service runs it: one process serving alone, or one worker
of several under ``app.supervisor``."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from app.config import Settings
from app.main import create_app
from model.checkpoint import Prepared


class Server(uvicorn.Server):
    """uvicorn's server, but a graceful stop on its signals exits with status 0.

    (uvicorn re-raises the signal after shutting down, so the process would die of
    it, status 143, and look like a crash to whatever started it.) ``signals``: those
    that stop it gracefully; a worker stops on SIGTERM only (SIGINT from a terminal
    reaches the whole process group: the supervisor decides).
    """

    def __init__(
        self, config: uvicorn.Config, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
    ) -> None:
        super().__init__(config)
        self._signals = signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        original = {sig: signal.signal(sig, self.handle_exit) for sig in self._signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
    }


def serve_alone(settings: Settings) -> None:
    """One process: the app on its own socket (SIGHUP reloads, see app.main)."""
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, **uvicorn_options(settings)
    )
    Server(config).run()


def run_worker(
    settings: Settings, listener: socket.socket, control: socket.socket, prepared: Prepared
) -> None:
    """A worker (in a process the supervisor forked): the app on the supervisor's
    socket, with ``prepared`` as its model and ``control`` to its supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (the supervisor's: it reloads everyone)
    app = create_app(settings, prepared=prepared, control=control)
    config = uvicorn.Config(app, **uvicorn_options(settings))
    Server(config, signals=(signal.SIGTERM,)).run(sockets=[listener])
