"""Reading the Dockerfile as the engine would: its last stage's instructions, the
image's environment and command, and what every stage copies from the build context."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(stage: str = "last") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined: the last stage's, or
    every stage's with ``stage="all"``."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    found = [tuple(line.split(None, 1)) for line in lines if line and line[0] != "#"]
    pairs = [(ins[0].upper(), ins[1] if len(ins) > 1 else "") for ins in found]
    if stage == "all":
        return pairs
    last_from = max(i for i, (instruction, _) in enumerate(pairs) if instruction == "FROM")
    return pairs[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in instructions():
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_command() -> list[str]:
    commands = [json.loads(args) for instruction, args in instructions() if instruction == "CMD"]
    return list(commands[-1])


def build_args() -> dict[str, str]:
    """Every ARG with a default, by name."""
    defaults = {}
    for instruction, args in instructions("all"):
        name, sep, default = args.partition("=")
        if instruction == "ARG" and sep:
            defaults[name] = default
    return defaults


def copies() -> dict[str, Path]:
    """Image path -> checkout path, for the last stage's COPY from the build context."""
    mapping = {}
    for instruction, args in instructions():
        parts = args.split()
        if instruction == "COPY" and not any(p.startswith("--from") for p in parts):
            mapping[parts[-1]] = ROOT / parts[0]
    return mapping


def context_sources() -> set[str]:
    """The sources of every stage's COPY from the build context."""
    sources: set[str] = set()
    for instruction, args in instructions("all"):
        parts = args.split()
        if instruction == "COPY" and not any(p.startswith("--from") for p in parts):
            sources |= set(parts[:-1])
    return sources
