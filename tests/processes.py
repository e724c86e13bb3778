"""What /proc says of a server's process tree: its workers, and their memory."""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> set[int]:
    """The processes ``pid`` started (its workers)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def memory_of(pid: int) -> dict[str, int]:
    """A process's and its children's RSS and PSS in kB (smaps_rollup)."""
    totals = {"Rss": 0, "Pss": 0}
    for each in (pid, *children(pid)):
        for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in totals:
                totals[name] += int(value.split()[0])
    return totals
