"""A Docker engine driven through its command line, for the engine tests: the image,
compose projects, health, per-container metrics, and steady traffic to a URL.

Only loopback addresses are ever sent requests: the tests publish every port on
127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Variables the compose file reads: the tests set their own, never the caller's.
COMPOSE_VARIABLES = re.compile(r"CTR_\w+|API_\w+|LB_PORT|REDIS_MAXMEMORY|COMPOSE_\w+")


def run(*args: str, timeout: float = 120, env: Mapping[str, str] | None = None) -> str:
    """Run a command; its stdout, or an AssertionError with its output."""
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    )
    return result.stdout


def engine_problem() -> str | None:
    """Why no engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no docker command on the PATH"
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if result.returncode != 0:
        return f"no Docker engine answers docker info: {result.stderr.strip()[-300:]}"
    if compose_command() is None:
        return "neither docker compose (v2) nor docker-compose (1.x) is installed"
    return None


def compose_command() -> list[str] | None:
    """Compose v2 when the docker CLI has it, else docker-compose 1.x."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return command
    return None


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, every: float = 0.2
) -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)
    return time.monotonic() - started


def health(container: str) -> str:
    """starting, healthy, unhealthy, or the state of a container that is not running."""
    state = run(
        "docker", "inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", container
    )
    status, _, checked = state.strip().partition(" ")
    return checked if status == "running" else status


def requests_served(container: str, endpoint: str = "/predict") -> int:
    """Calls to ``endpoint`` the container's service answered 200, from its own /metrics."""
    script = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
    metrics = run("docker", "exec", container, "python", "-c", script)
    pattern = rf'^ctr_requests_total\{{endpoint="{re.escape(endpoint)}",status="200"\}} (\S+)$'
    found = re.search(pattern, metrics, re.MULTILINE)
    return int(float(found[1])) if found else 0


@dataclass
class Compose:
    """One compose project of the repository's docker-compose.yml."""

    command: list[str]
    project: str
    variables: dict[str, str]
    profiles: Sequence[str] = ()

    def env(self) -> dict[str, str]:
        kept = {k: v for k, v in os.environ.items() if not COMPOSE_VARIABLES.fullmatch(k)}
        return {**kept, **self.variables}

    def __call__(self, *args: str, timeout: float = 300) -> str:
        profiles = [arg for profile in self.profiles for arg in ("--profile", profile)]
        command = [*self.command, "-f", str(COMPOSE_FILE), "-p", self.project, *profiles, *args]
        return run(*command, timeout=timeout, env=self.env())

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).split()

    def wait_healthy(self, service: str, count: int = 1, timeout: float = 180) -> float:
        def healthy() -> bool:
            containers = self.containers(service)
            return len(containers) == count and all(health(c) == "healthy" for c in containers)

        return wait_until(healthy, timeout, f"{count} healthy {service}", every=0.5)

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "10")

    def leftovers(self) -> dict[str, list[str]]:
        """What of this project still exists on the engine: containers, networks, volumes."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": run("docker", "ps", "-aq", "--filter", label).split(),
            "networks": run("docker", "network", "ls", "-q", "--filter", label).split(),
            "volumes": run("docker", "volume", "ls", "-q", "--filter", label).split(),
        }


@dataclass
class Traffic:
    """Calls ``url`` + /predict one after another from a thread, each with the next row,
    until stopped (at most ``limit`` calls, ``seconds`` long); records each outcome."""

    url: str
    rows: Sequence[dict[str, Any]]
    limit: int = 5000
    seconds: float = 180
    outcomes: list[tuple[int, dict[str, Any] | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for i in range(self.limit):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                row = self.rows[i % len(self.rows)]
                try:
                    response = client.post("/predict", json={"features": row})
                    body = response.json() if response.status_code == 200 else response.text
                    self.outcomes.append((response.status_code, body))
                except httpx.HTTPError as exc:
                    self.outcomes.append((0, repr(exc)))
                time.sleep(0.01)

    def wait_for(self, calls: int, timeout: float = 60) -> None:
        """Wait until ``calls`` more calls have been answered."""
        target = len(self.outcomes) + calls
        wait_until(lambda: len(self.outcomes) >= target, timeout, f"{calls} more calls")
