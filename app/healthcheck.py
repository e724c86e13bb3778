"""``python -m app.healthcheck``: exit 0 when the local server answers /healthz, else 1.

The container's HEALTHCHECK, with nothing but the Python the image already has
(no curl). It asks the port the server listens on (``CTR_PORT``).
"""

from __future__ import annotations

import sys
import urllib.request

from app.config import Settings

PATH = "/healthz"
TIMEOUT_S = 3.0


def main() -> int:
    url = f"http://127.0.0.1:{Settings().port}{PATH}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
