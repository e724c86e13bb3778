"""Real Redis servers for the tests, on free loopback ports, that a test can stop, kill,
pause (SIGSTOP) and start again. Never a mock: ``redis-server`` must be installed
(``.ci/run`` installs it)."""

from __future__ import annotations

import asyncio
import ctypes
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too, as Redis needs."""
    rng = random.Random()
    while True:
        port = rng.randrange(20_000, 55_535)
        if all(_is_free(p) for p in (port, port + 10_000)):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def redis_binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: apt-get install redis-server")
    return path


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, so no server outlives a crash."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """One redis-server process that keeps nothing on disk (like the machines' own)."""

    def __init__(self, workdir: Path, extra: Sequence[str] = (), port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = list(extra)
        self.password: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += ["--logfile", str(self.workdir / "redis.log"), *self.extra]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        self.wait_ready()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return
            except redis.exceptions.ConnectionError:
                if self.process is not None and self.process.poll() is not None:
                    log = (self.workdir / "redis.log").read_text().splitlines()[-3:]
                    raise RuntimeError(f"redis-server exited: {log}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            except redis.exceptions.AuthenticationError:
                return  # up, and asking for a password

    def kill(self) -> None:
        """SIGKILL: the server dies with everything it held."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


class RedisCluster:
    """Masters on loopback ports, joined by ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                port=free_cluster_port(),
            )
            for i in range(masters)
        ]
        for node in self.nodes:
            node.extra += ["--cluster-config-file", str(node.workdir / "nodes.conf")]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = [redis_binary("redis-cli"), "--cluster", "create", *addresses]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(self._state_ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    @staticmethod
    def _state_ok(node: RedisServer) -> bool:
        with node.client() as c:
            info = c.cluster("info")
        return bool(info.get("cluster_state") == "ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SlowProxy:
    """A TCP proxy in front of a server that holds each reply back ``delay`` seconds: a
    Redis that answers, but slowly; ``cut`` and ``restore`` the link: a network
    partition. Runs on the test's event loop."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.down = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> SlowProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Drop every connection and refuse new ones until ``restore``."""
        self.down = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, slow=False),
            self._pipe(up_reader, writer, slow=True),
            return_exceptions=True,
        )

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, slow: bool
    ) -> None:
        try:
            while data := await source.read(1 << 16):
                if slow and self.delay:
                    await asyncio.sleep(self.delay)
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
