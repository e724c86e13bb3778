"""``python -m app``: serve with uvicorn, settings from the environment (CTR_*)."""

from __future__ import annotations

import uvicorn

from app.config import Settings
from app.logs import configure
from app.main import create_app


def main() -> None:
    settings = Settings()
    configure(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


if __name__ == "__main__":
    main()
