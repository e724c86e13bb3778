"""Fixtures of the engine tests: a Docker engine (or a skip saying why not), the image
built once per session, and the figures they measure, shown at the end of the run."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib

import pytest

from tests.deploy.engine import ROOT, compose_command, engine_problem, run

IMAGE = "ctr-serve:engine-test"
WHEELS = ROOT / "wheels"
FIGURES = pytest.StashKey[dict[str, str]]()


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> dict[str, str]:
    """What the engine tests measured (size, build time, time to healthy, to stop)."""
    return request.config.stash.setdefault(FIGURES, {})


@pytest.fixture(scope="session")
def compose_cli() -> list[str]:
    """The compose command, once an engine answers; else the test is skipped."""
    problem = engine_problem()
    if problem is not None:
        pytest.skip(f"engine tests need a Docker engine: {problem}")
    command = compose_command()
    assert command is not None
    return command


@pytest.fixture(scope="session")
def image(compose_cli: list[str], figures: dict[str, str]) -> str:
    """The Dockerfile's image, built once per session. torch comes from wheels/, filled
    as the README says for a build without PyTorch's index."""
    if not any(WHEELS.glob("torch-*.whl")):
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        torch = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS)]
        subprocess.run([*download, torch], check=True, timeout=600, capture_output=True)
    started = time.monotonic()
    run("docker", "build", "--tag", IMAGE, str(ROOT), timeout=1200)
    figures["build time"] = f"{time.monotonic() - started:.1f} s (with the layers the engine had)"
    size = int(run("docker", "image", "inspect", "--format", "{{.Size}}", IMAGE))
    figures["image size"] = f"{size / 1e6:.0f} MB"
    return IMAGE


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    measured = config.stash.get(FIGURES, {})
    if measured:
        terminalreporter.section("Docker engine figures")
        for name, value in measured.items():
            terminalreporter.write_line(f"{name}: {value}")
