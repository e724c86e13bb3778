"""``python -m app [--option value ...]``: serve with uvicorn, settings from the
environment (CTR_*) and the command line (``--help`` lists them; an option wins over
its variable).

One worker process per CPU available by default (``CTR_WORKERS``), under a supervisor
(``app.supervisor``); with one, the process serves alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from app.config import Settings, UnknownSetting
from app.logs import configure


def main(argv: list[str] | None = None) -> None:
    # SIGHUP reloads the model once the server runs; until then it must not terminate
    # the process, its default action.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        settings = Settings.of_server(sys.argv[1:] if argv is None else argv)
    except (UnknownSetting, ValidationError) as exc:
        raise SystemExit(f"python -m app: {exc}") from None
    configure(settings.log_level)
    # The imports below come after the settings on purpose: prometheus_client picks its
    # multiprocess mode when first imported, from PROMETHEUS_MULTIPROC_DIR.
    if settings.worker_count == 1:
        from app.server import serve_alone

        serve_alone(settings)
        return
    with scratch(settings) as (run_dir, metrics_dir):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        # NumPy's BLAS would start a thread per CPU in the supervisor (no process to fork
        # from) and in every worker (whose CPU is its own).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from app.server import run_worker
        from app.supervisor import Supervisor

        workers = settings.model_copy(update={"metrics_dir": metrics_dir})
        status = Supervisor(workers, run_dir, run_worker).run()
    raise SystemExit(status)


@contextlib.contextmanager
def scratch(settings: Settings) -> Iterator[tuple[Path, Path]]:
    """The server's scratch folder (vocabulary indexes), removed at exit, and the
    workers' metric files' folder: CTR_METRICS_DIR, emptied, else one in the scratch."""
    path = Path(tempfile.mkdtemp(prefix="ctr-serve-"))
    try:
        metrics_dir = settings.metrics_dir or path / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        yield path, metrics_dir
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
