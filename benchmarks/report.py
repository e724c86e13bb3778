"""Writing a benchmark's figures to benchmarks/results/: JSON for machines, Markdown for people."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def write(name: str, figures: dict[str, Any], markdown: str, results: Path = RESULTS) -> Path:
    """Write ``<name>.json`` and ``<name>.md``; return the Markdown path."""
    results.mkdir(parents=True, exist_ok=True)
    figures = {**figures, "environment": environment()}
    (results / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    path = results / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    return path


def target(value: float, goal: str, met: bool) -> dict[str, Any]:
    """One target's entry: the measured value, the goal as written, and whether it is met."""
    return {"value": value, "target": goal, "met": met}


def targets_table(targets: dict[str, dict[str, Any]], value_format: str = ".3f") -> list[str]:
    """Markdown lines: one row per target, a miss in bold."""
    return [
        "| target | value | met |",
        "|---|---|---|",
        *(
            f"| {name} {t['target']} | {t['value']:{value_format}} | "
            f"{'yes' if t['met'] else '**no**'} |"
            for name, t in targets.items()
        ),
    ]


def publish(name: str, figures: dict[str, Any], lines: list[str]) -> None:
    """``write`` the report, and print it with where it went."""
    out = write(name, figures, "\n".join(lines))
    print("\n".join(lines))
    print(f"written to {out}")
