"""Run docker-compose.yml's default services as local processes, as the file declares
them, where no Docker engine runs; check that they serve predictions; stop them.

    .venv/bin/python deploy/compose_smoke.py

What compose would do, done by hand:
- ``redis``: the service's command, with the local redis-server, on a free loopback
  port (the service's address ``redis:6379`` maps to ``127.0.0.1:<that port>``);
- wait for its healthcheck (its ``test`` command, at its interval, within its
  start period and retries), since ``api`` depends on it being healthy;
- ``api``: the image's command (the Dockerfile's CMD; the service sets none), with
  the image's environment (the Dockerfile's ENV) overlaid by the service's, ``${VAR:-default}``
  interpolated from this environment, container paths mapped to the checkout (the
  Dockerfile's COPY and the service's volumes), and its port 8000 on a free
  loopback port;
- wait for its healthcheck, send /predict and /predict_many, check /readyz names
  the Redis store in state ok, then stop both (SIGTERM; the api must exit 0).

Exits non-zero, saying what failed, if anything does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
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


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [tuple(line.split(None, 1)) for line in lines if line and line[0] != "#"]
    last_from = max(i for i, ins in enumerate(instructions) if ins[0].upper() == "FROM")
    return [(ins[0].upper(), ins[1] if len(ins) > 1 else "") for ins in instructions[last_from:]]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_command() -> list[str]:
    commands = [json.loads(a) for i, a in dockerfile_instructions() if i == "CMD"]
    return list(commands[-1])


def path_map(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> checkout path: the image's COPY (from the context) and the
    service's bind mounts."""
    mapping = {}
    for instruction, args in dockerfile_instructions():
        parts = args.split()
        if instruction == "COPY" and not any(p.startswith("--from") for p in parts):
            mapping[parts[-1]] = ROOT / parts[0]
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mapping[target] = (ROOT / source).resolve()
    return mapping


def local_path(value: str, mapping: dict[str, Path]) -> str:
    for target in sorted(mapping, key=len, reverse=True):
        if value == target or value.startswith(target + "/"):
            return str(mapping[target] / value[len(target) :].lstrip("/"))
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def wait_healthy(name: str, check: dict[str, Any], command: list[str], env: dict[str, str]) -> None:
    """Run the healthcheck's command as compose does until it passes."""
    interval = seconds(check.get("interval", "30s"))
    deadline = time.monotonic() + seconds(check.get("start_period", "0s"))
    deadline += interval * int(check.get("retries", 3))
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        if result.returncode == 0:
            print(f"{name}: healthy")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} never became healthy: {result.stdout}{result.stderr}")
        time.sleep(min(interval, 0.5))


def post(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200, response.status
        return json.load(response)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def main() -> int:
    services = interpolate(yaml.safe_load(COMPOSE.read_text())["services"])
    redis_service, api_service = services["redis"], services["api"]
    assert api_service["depends_on"]["redis"]["condition"] == "service_healthy"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # -- redis
        redis_port = free_port()
        command = list(redis_service["command"])
        assert command[0] == "redis-server", command
        server = shutil.which("redis-server") or "redis-server"
        command = [server, *command[1:], "--port", str(redis_port), "--bind", "127.0.0.1"]
        print("redis:", shlex.join(command))
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        check = redis_service["healthcheck"]
        test = check["test"]
        assert test[:2] == ["CMD", "redis-cli"], test
        local_test = ["redis-cli", "-h", "127.0.0.1", "-p", str(redis_port), *test[2:]]
        wait_healthy("redis", check, local_test, dict(os.environ))

        # -- api
        api_port = free_port()
        mapping = path_map(api_service)
        env = {**image_env(), **{k: str(v) for k, v in api_service["environment"].items()}}
        env = {k: local_path(v, mapping) for k, v in env.items()}
        env["CTR_REDIS_URL"] = env["CTR_REDIS_URL"].replace("redis:6379", f"127.0.0.1:{redis_port}")
        published = [p.split(":") for p in api_service["ports"]]
        assert [c for _, c in published] == [env["CTR_PORT"]], (published, env["CTR_PORT"])
        env["CTR_HOST"], env["CTR_PORT"] = "127.0.0.1", str(api_port)
        env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        command = image_command()
        assert command[0] == "python", command
        command = [sys.executable, *command[1:]]
        shown = {k: v for k, v in env.items() if k.startswith("CTR_")}
        print("api:", shlex.join(command), "with", shown)
        processes.append(subprocess.Popen(command, env=env, cwd=mapping.get("/app", ROOT)))
        check = api_service["healthcheck"]
        test = check["test"]
        assert test[:2] == ["CMD", "python"], test
        wait_healthy("api", check, [sys.executable, *test[2:]], env)

        # -- predictions
        base = f"http://127.0.0.1:{api_port}"
        with urllib.request.urlopen(base + "/readyz", timeout=10) as response:
            ready = json.load(response)
        assert ready["embedding_store"] == {"backend": "redis", "state": "ok"}, ready
        row = {"I1": 3, "I5": 17668, "C1": "05db9164", "C2": 80}
        one = post(base + "/predict", {"features": row})
        many = post(base + "/predict_many", {"instances": [row, {}, {"C3": "x"}]})
        assert 0 < one["probability"] < 1 and len(many["probabilities"]) == 3
        assert abs(many["probabilities"][0] - one["probability"]) < 1e-6
        print(f"predictions: {one}, {many}")
        code = stop(processes.pop())
        if code != 0:
            raise SystemExit(f"the api exited with {code} on SIGTERM")
        print("compose smoke test passed")
        return 0
    finally:
        for process in reversed(processes):
            stop(process)


if __name__ == "__main__":
    raise SystemExit(main())
