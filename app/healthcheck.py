"""``python -m app.healthcheck``: exit 0 when the local server answers /healthz, else 1.

The container's HEALTHCHECK, with nothing but the standard library: it runs every
few seconds in every container, so it must not pay for importing pydantic, torch
or numpy (with four replicas on two CPUs that cost once passed its timeout). For
that one reason it reads ``CTR_PORT`` itself instead of through ``app.config``;
a test holds its default equal to the setting's.
"""

from __future__ import annotations

import os
import sys
import urllib.request

PATH = "/healthz"
DEFAULT_PORT = 8000
TIMEOUT_S = 3.0


def main() -> int:
    port = os.environ.get("CTR_PORT", "").strip() or str(DEFAULT_PORT)
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
