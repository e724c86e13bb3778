"""``python -m app [--option value ...]``: serve with uvicorn, settings from the
environment (CTR_*) and the command line (``--help`` lists them; an option wins over
its variable).

One process by default; ``CTR_WORKERS=n`` runs n under uvicorn's supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn
from pydantic import ValidationError

from app.config import Settings, UnknownSetting
from app.logs import configure
from app.main import create_app


class Server(uvicorn.Server):
    """uvicorn's server, but a graceful stop on SIGTERM or SIGINT exits with status 0.

    (uvicorn re-raises the signal after shutting down, so the process would die of
    it, status 143, and look like a crash to whatever started it.)
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    # SIGHUP reloads the model once the app runs (app.main); until then, and with
    # several workers (uvicorn's supervisor handles it: it restarts the workers), it
    # must not terminate the process, its default action.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        settings = Settings.of_server(sys.argv[1:] if argv is None else argv)
    except (UnknownSetting, ValidationError) as exc:
        raise SystemExit(f"python -m app: {exc}") from None
    configure(settings.log_level)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
    }
    if settings.workers > 1:
        # uvicorn's supervisor: each worker process builds its app from the environment,
        # which must then hold the command line's options too.
        os.environ.update(settings.environment())
        uvicorn.run("app.main:create_app", factory=True, workers=settings.workers, **options)
        return
    Server(uvicorn.Config(create_app(settings), **options)).run()


if __name__ == "__main__":
    main()
