"""The Dockerfile and docker-compose.yml, held true without a Docker engine: schema,
lint, settings, command, healthcheck, port and paths. test_engine.py runs them on a
real engine."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from app import healthcheck
from app.config import Settings
from app.main import create_app
from model.checkpoint import load_checkpoint
from tests.deploy.dockerfile import (
    build_args,
    context_sources,
    copies,
    image_command,
    image_env,
    instructions,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR}`` / ``${VAR:-default}``, from this process's environment."""
    if isinstance(value, str):
        return INTERPOLATION.sub(lambda m: os.environ.get(m[1]) or (m[2] or ""), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def path_map(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> checkout path: the image's COPY and the service's bind mounts."""
    mapping = copies()
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mapping[target] = (ROOT / source).resolve()
    return mapping


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = interpolate(compose["services"])
    return resolved


API_SERVICES = ("api", "api-replica")


def test_the_compose_file_follows_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    # The spec names draft 7 (without the "#" jsonschema looks the draft up by).
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(compose)
    # And it would catch a mistake: a misspelt key is refused.
    broken = {**compose, "services": {**compose["services"], "api": {"imagee": "x"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_the_compose_file_suits_docker_compose_1_29(compose: dict[str, Any]) -> None:
    # 1.29 refuses a top-level name:, so the project's name is in the committed .env,
    # which both Compose versions read from the compose file's folder.
    assert "name" not in compose
    env = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env == {"COMPOSE_PROJECT_NAME": "ctr-serve"}


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""  # not even a warning or an info


def test_every_ctr_variable_set_is_a_real_setting(services: dict[str, Any]) -> None:
    names = set(image_env())
    for service in API_SERVICES:
        names |= set(services[service]["environment"])
    ctr = {n for n in names if n.startswith("CTR_")}
    assert ctr >= {"CTR_REDIS_URL", "CTR_HOST", "CTR_PORT", "CTR_MODEL_DIR", "CTR_HOLD_TABLES"}
    unknown = {n for n in ctr if n.removeprefix("CTR_").lower() not in Settings.model_fields}
    assert not unknown, f"not settings: {unknown}"


@pytest.mark.parametrize("service", API_SERVICES)
def test_the_environment_makes_valid_settings(
    services: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**image_env(), **{k: str(v) for k, v in services[service]["environment"].items()}}
    for key, value in env.items():
        if key.startswith("CTR_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.store == "redis"
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.hold_tables is (service == "api")


def test_command_healthcheck_and_port_point_at_the_real_app(services: dict[str, Any]) -> None:
    # CMD ["python", "-m", "app"]: the module runs app.__main__.main.
    command = image_command()
    assert command[:2] == ["python", "-m"]
    assert callable(importlib.import_module(f"{command[2]}.__main__").main)
    # HEALTHCHECK (image and compose): python -m app.healthcheck, which asks a real route.
    image_check = next(args for i, args in instructions() if i == "HEALTHCHECK")
    checks = [json.loads(image_check.split("CMD", 1)[1])]
    checks += [services[s]["healthcheck"]["test"][1:] for s in API_SERVICES]
    for check in checks:
        assert check == ["python", "-m", "app.healthcheck"]
    app = create_app(Settings())
    assert asyncio.run(get_json(app, healthcheck.PATH)) == {"status": "ok"}
    # One port everywhere: EXPOSE, CTR_PORT, the published port, nginx's upstream.
    exposed = [args for i, args in instructions() if i == "EXPOSE"]
    assert exposed == [image_env()["CTR_PORT"]] == ["8000"]
    assert services["api"]["ports"] == ["8000:8000"]
    for service in API_SERVICES:
        assert services[service]["environment"]["CTR_PORT"] == "8000"
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    # A variable, so that nginx resolves the replicas again through Docker's DNS.
    assert re.search(r"resolver 127\.0\.0\.11 valid=\d+s", nginx)
    assert re.search(r"set \$api http://api-replica:8000;", nginx)
    assert "proxy_pass $api;" in nginx
    assert services["lb"]["volumes"] == ["./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro"]


async def get_json(app: Any, path: str) -> Any:
    """GET ``path`` from the app (no lifespan: the health route needs no model)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ctr") as client:
        return (await client.get(path)).json()


def test_the_image_serves_the_bundled_model_and_mounts_users_models(
    services: dict[str, Any],
) -> None:
    mapping = path_map(services["api"])
    model_dir = services["api"]["environment"]["CTR_MODEL_DIR"]
    assert model_dir == image_env()["CTR_MODEL_DIR"] == "/app/models/default"
    load_checkpoint(mapping[model_dir])  # what the image copies is a valid checkpoint
    assert mapping["/models"] == ROOT / "models"  # ./models:/models:ro by default
    # .dockerignore ignores everything but what the Dockerfile copies from the context.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    let_in = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    expected = {"pyproject.toml", "README.md", "app", "model", "models/default", "wheels"}
    assert let_in == context_sources() == expected
    # wheels/ is committed (with its README) so that COPY finds it with no wheel in it.
    assert (ROOT / "wheels" / "README.md").is_file()


def test_the_image_installs_the_torch_that_pyproject_pins() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch==")]
    assert pins == [f"torch=={build_args()['TORCH_VERSION']}"]


def test_redis_never_evicts_and_the_api_waits_for_it(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-alpine)?", redis["image"])  # pinned 7.x
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for service in API_SERVICES:
        depends = services[service]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert services[service]["environment"]["CTR_REDIS_URL"] == "redis://redis:6379/0"
        assert services[service]["restart"] == "unless-stopped"
    assert services["api-replica"]["profiles"] == ["scale"]
    assert services["lb"]["profiles"] == ["scale"]
