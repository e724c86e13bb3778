"""The serving set (pyproject.toml's dependencies) is all that ``python -m app`` needs,
and holds none of the training stack: the image installs that set alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from model.checkpoint import load_checkpoint
from model.predict import Predictor
from tests.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAINING_MODULES = {"pyarrow", "sklearn", "scipy", "matplotlib", "tqdm"}
TRAINING_DISTRIBUTIONS = {"pyarrow", "scikit-learn", "scipy", "matplotlib", "tqdm"}
ROW = {"I1": 3, "I5": 17668, "C1": "05db9164", "C2": 80}

# `python -m app` with every module of a distribution outside argv[1] unimportable, as
# in the image's site-packages; at exit, writes the top-level modules it loaded to
# argv[2].
SERVE_WITH_ONLY = textwrap.dedent(
    """
    import atexit, importlib.abc, json, runpy, sys
    from importlib import metadata
    from pathlib import Path

    allowed, report = set(json.loads(sys.argv[1])), Path(sys.argv[2])
    owners = metadata.packages_distributions()

    class OnlyServingSet(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            top = name.partition(".")[0]
            dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
            if dists and not dists & allowed:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    def loaded():
        modules = sorted({m.partition(".")[0] for m in sys.modules})
        report.write_text(json.dumps(modules))

    sys.meta_path.insert(0, OnlyServingSet())
    atexit.register(loaded)
    sys.argv = ["app"]
    runpy.run_module("app", run_name="__main__", alter_sys=True)
    """
)


def requirement_closure(roots: list[Requirement]) -> set[str]:
    """The distributions that ``roots`` need, as installed here, markers and extras applied."""
    seen: set[str] = set()
    needed: set[str] = set()
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        needed.add(name)
        extras = {"", *requirement.extras}
        for line in metadata.requires(name) or []:
            child = Requirement(line)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in extras):
                todo.append(child)
    return needed


def test_the_serving_set_holds_no_training_package() -> None:
    serving = requirement_closure([Requirement("ctr-serve")])
    assert {"torch", "fastapi", "uvicorn", "redis", "safetensors"} <= serving
    assert not TRAINING_DISTRIBUTIONS & serving
    # The tests train models: the dev extra brings the training set in.
    dev = requirement_closure([Requirement("ctr-serve[dev]")])
    assert {"pyarrow", "scikit-learn", "matplotlib", "tqdm"} <= dev


def test_python_m_app_serves_with_the_serving_set_alone(tmp_path: Path) -> None:
    allowed = sorted(requirement_closure([Requirement("ctr-serve")]))
    modules_file = tmp_path / "modules.json"
    port = free_port()
    env = {**os.environ, "CTR_PORT": str(port), "CTR_LOG_LEVEL": "warning"}
    env.pop("CTR_REDIS_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITH_ONLY, json.dumps(allowed), str(modules_file)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        response = httpx.post(url + "/predict", json={"features": ROW}, timeout=10)
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    assert response.status_code == 200, response.text
    assert server.returncode == 0, stderr[-3000:]
    expected = Predictor(load_checkpoint(ROOT / "models" / "default")).predict_rows([ROW])[0]
    assert abs(response.json()["probability"] - expected) < 1e-6
    loaded = set(json.loads(modules_file.read_text()))
    assert {"torch", "fastapi", "uvicorn"} <= loaded
    assert not TRAINING_MODULES & loaded
