"""The container's healthcheck: standard library only, and it asks the real server."""

import subprocess
import sys

import pytest

from app import healthcheck
from app.config import DEFAULT_MODEL_DIR, Settings
from model.default_model import DEFAULT_MODEL_DIR as RECIPE_OUTPUT
from tests.server_process import start


def modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_healthcheck_imports_only_the_standard_library() -> None:
    loaded = modules_after_import("app.healthcheck")
    top = {name.split(".")[0] for name in loaded}
    heavy = {"torch", "numpy", "pydantic", "pydantic_settings", "model", "sklearn", "pyarrow"}
    assert not top & heavy
    # Beside the standard library: the interpreter's own start-up hooks (site's
    # setuptools shim, an editable install's path finder).
    others = {n for n in top - {"app"} if n not in sys.stdlib_module_names}
    assert all(n in {"__main__", "_distutils_hack"} or n.startswith("__editable__") for n in others)


def test_settings_do_not_load_the_training_stack() -> None:
    top = {name.split(".")[0] for name in modules_after_import("app.config")}
    assert not top & {"torch", "numpy", "sklearn", "pyarrow", "matplotlib", "model"}


def test_defaults_agree_with_the_settings() -> None:
    assert Settings().port == healthcheck.DEFAULT_PORT
    assert DEFAULT_MODEL_DIR == RECIPE_OUTPUT


def test_healthcheck_passes_on_a_live_server_and_fails_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    process, url = start()
    monkeypatch.setenv("CTR_PORT", url.rsplit(":", 1)[1])
    try:
        assert healthcheck.main() == 0
    finally:
        process.terminate()
        process.communicate(timeout=30)
    # The same port, now closed.
    assert healthcheck.main() == 1
