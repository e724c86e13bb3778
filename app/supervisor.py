"""The supervisor: ``python -m app`` with more than one worker.

It binds the listening socket, verifies the checkpoint once, and forks the workers,
which accept connections on that one socket. What a worker needs of the model is
shared through the operating system: the supervisor has imported torch and the app
before it forks (their pages are shared, copy-on-write), and every worker maps the
checkpoint's tables and vocabulary index from the same files (page cache), so a
worker costs its interpreter's working set, not a copy of the model.

- **One model version.** A reload (``POST /admin/reload`` on any worker, or SIGHUP to
  the supervisor) is verified here once; a bad checkpoint changes nothing. Then every
  worker loads it beside its current model; once all have, every worker swaps; the
  reload answers when all have swapped. A worker that refuses the load aborts the
  reload everywhere; one that does not answer in ``CTR_RELOAD_TIMEOUT_S`` is replaced.
- **Replacement.** A worker that dies is forked again, serving the current version
  (the last reload's); one that keeps dying soon after its start waits longer each
  time (0.5 s, 1.5 s, 3.5 s... 30 s at most). If the first workers fail before any
  became ready, the server stops with status 1 (a broken deployment, not a crash).
- **Shutdown.** SIGTERM or SIGINT: every worker drains (answers what it accepted,
  ``CTR_SHUTDOWN_TIMEOUT_S`` at most), then the supervisor exits 0.

The supervisor runs no torch operation and no thread of its own (``python -m app``
keeps NumPy's OpenBLAS to one thread, which starts none): forking from a process with
threads can leave a child deadlocked on a lock held by a thread that was not copied.
Signals are blocked across a fork, so a worker never runs the supervisor's handlers.
It is one loop over a selector: worker control sockets (``app.control``) and a
wake-up pipe for signals.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess

from app.config import Settings
from app.control import Message, decode_lines, encode
from app.metrics import Metrics
from model.checkpoint import SPEC_FILE, CheckpointError, Prepared, prepare_checkpoint

log = logging.getLogger(__name__)

TICK_S = 0.2  # the loop's longest sleep: timeouts are checked this often
HANDLED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
SEND_TIMEOUT_S = 1.0  # a worker's channel full this long: the worker is stuck
KILL_GRACE_S = 5.0  # past the drain's own timeout, before SIGKILL
YOUNG_S = 10.0  # a worker that dies sooner after its start waits longer to start again
MAX_RESTART_DELAY_S = 30.0


@dataclass
class Worker:
    pid: int
    slot: int  # which listener it accepts on
    control: socket.socket
    prepared: Prepared  # what it was started with, or last swapped to
    started: float = field(default_factory=time.monotonic)
    buffer: bytearray = field(default_factory=bytearray)
    ready: bool = False
    stopping: float | None = None  # when it was sent SIGTERM (its exit is no death)


@dataclass
class Reload:
    """One reload under way: its phase and who has yet to answer."""

    id: int
    directory: Path
    answer: Callable[[int, dict[str, Any]], None]
    prepared: Prepared
    replaced: Prepared  # the version served when it began
    phase: str = "load"  # then "swap"
    waiting: set[int] = field(default_factory=set)
    loaded: set[int] = field(default_factory=set)
    late: set[int] = field(default_factory=set)  # did not answer in time: replaced
    refusal: tuple[int, str] | None = None
    deadline: float = 0.0


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        run_worker: Callable[[Settings, socket.socket, socket.socket, Prepared], None],
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self._run_worker = run_worker
        self.listeners: list[socket.socket | None] = list(
            listen(settings.host, settings.port, settings.worker_count)
        )
        self.port = self.listeners[0].getsockname()[1]  # type: ignore[union-attr]
        self.workers: dict[int, Worker] = {}
        self.current: Prepared | None = None
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._reload: Reload | None = None
        self._queued: list[tuple[Path, Callable[[int, dict[str, Any]], None]]] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._status = 0  # the exit status
        self._ever_ready = False  # some worker started: a later death is no start-up failure
        self._deaths: dict[int, int] = {}  # per slot: deaths in a row, each soon after a start
        self._restarts: list[tuple[float, int]] = []  # (when, slot) of workers to start again
        self._wake = socket.socketpair()
        # The server's reloads and worker deaths, in the workers' /metrics (metric files).
        self.metrics = Metrics()

    # -- start, run, stop

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status."""
        try:
            self.current = self._prepare(self.settings.model_dir)
        except Exception as exc:
            log.error("cannot start: %s", exc)
            return 1
        wake_r, wake_w = self._wake
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._on_signal)
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        log.info(
            "serving %s on http://%s:%d with %d workers of %d torch thread%s",
            self.current.version,
            self.settings.host,
            self.settings.port,
            self.settings.worker_count,
            self.settings.threads_per_worker,
            "" if self.settings.threads_per_worker == 1 else "s",
        )
        gc.freeze()  # what the workers inherit: the collector leaves its pages shared
        for slot in range(self.settings.worker_count):
            self._fork(slot)
        try:
            while not self._stopping:
                for key, _ in self._selector.select(TICK_S):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            wake_r.recv(4096)
                    else:
                        self._read(key.data)
                self._handle_signals()
                self._reap()
                self._restart_due()
                self._kill_stragglers()
                self._check_reload()
            return self._stop()
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
            self._close_listeners()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping: %s", signal.Signals(signum).name)
                self._stopping = True
            elif signum == signal.SIGHUP:
                self._request_reload(self.settings.model_dir, _log_outcome)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            if listener is not None:
                listener.close()
        self.listeners = [None] * len(self.listeners)

    def _stop(self) -> int:
        """Drain every worker (SIGTERM), wait for them, then exit 0."""
        # Once the workers close theirs too, a new connection is refused at once instead
        # of waiting in a backlog that nobody will accept from.
        self._close_listeners()
        self._abandon_reloads()
        for worker in self.workers.values():
            self._terminate(worker)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + KILL_GRACE_S
        while self.workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for worker in list(self.workers.values()):
            log.error("worker %d did not stop in time: killing it", worker.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
            self._forget(worker.pid)
        log.info("stopped")
        return self._status

    def _abandon_reloads(self) -> None:
        """At shutdown: the reload under way and those queued end with a 503 (the
        workers drop what they loaded as they stop)."""
        shutting_down = {"detail": "the service is shutting down"}
        reload, self._reload = self._reload, None
        if reload is not None:
            reload.answer(503, shutting_down)
        for _, answer in self._queued:
            answer(503, shutting_down)
        self._queued = []

    # -- workers

    def _fork(self, slot: int) -> None:
        """Start a worker on the current version, accepting on listener ``slot``."""
        prepared = self.current
        assert prepared is not None
        if self.listeners[slot] is None:  # (closed while its worker waited to restart)
            self.listeners[slot] = listen(self.settings.host, self.port, 1)[0]
        listener = self.listeners[slot]
        assert listener is not None
        mine, theirs = socket.socketpair()
        # Until the worker has its own handlers, a signal must not run the supervisor's.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            raise
        if pid == 0:  # the worker: it never returns to the supervisor's loop
            code = 1
            try:
                mine.close()
                self._leave(listener)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                self._run_worker(self.settings, listener, theirs, prepared)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        theirs.close()
        mine.settimeout(SEND_TIMEOUT_S)  # (reads happen when the selector says readable)
        worker = Worker(pid, slot, mine, prepared)
        self.workers[pid] = worker
        self._selector.register(mine, selectors.EVENT_READ, worker)

    def _leave(self, listener: socket.socket) -> None:
        """In a worker just forked: drop what is the supervisor's (its signal handlers,
        its selector, the other workers' channels, the other slots' listeners). SIGINT
        and SIGHUP are the supervisor's to act on: a worker ignores them."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            ignored = sig in (signal.SIGINT, signal.SIGHUP)
            signal.signal(sig, signal.SIG_IGN if ignored else signal.SIG_DFL)
        self._selector.close()
        others = [sock for sock in self.listeners if sock is not None and sock is not listener]
        for sock in (*self._wake, *(w.control for w in self.workers.values()), *others):
            sock.close()

    def _reap(self) -> None:
        """Collect exited workers; replace those that died while they should serve."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.get(pid)
            if worker is None:
                continue
            self._forget(pid)
            if worker.stopping is not None or self._stopping:
                if status != 0:  # (a drain ends with status 0)
                    log.warning("worker %d ended with %s", pid, _describe(status))
                continue
            self.metrics.worker_deaths.inc()
            if not worker.ready and not self._ever_ready:
                log.error("worker %d failed to start (%s): stopping", pid, _describe(status))
                self._stopping = True
                self._status = 1
                continue
            # A worker that dies young again and again waits longer each time.
            young = time.monotonic() - worker.started < YOUNG_S
            self._deaths[worker.slot] = self._deaths.get(worker.slot, 0) + 1 if young else 0
            delay = min(MAX_RESTART_DELAY_S, 0.5 * (2 ** self._deaths[worker.slot] - 1))
            log.error(
                "worker %d died (%s): starting another on %s%s",
                pid,
                _describe(status),
                (self.current or worker.prepared).version,
                f" in {delay:.1f} s" if delay else "",
            )
            if delay and (listener := self.listeners[worker.slot]) is not None:
                # Nobody accepts on it meanwhile: its connections would wait, then be
                # reset. The other slots take them; it opens again with its worker.
                listener.close()
                self.listeners[worker.slot] = None
            self._restarts.append((time.monotonic() + delay, worker.slot))

    def _restart_due(self) -> None:
        if self._reload is not None:  # (it would start on the version being replaced)
            return
        now = time.monotonic()
        for due in [r for r in self._restarts if r[0] <= now]:
            self._restarts.remove(due)
            self._fork(due[1])

    def _forget(self, pid: int) -> None:
        worker = self.workers.pop(pid)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.control)
        worker.control.close()
        # Its counters stay in the totals; its live gauges go.
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        if self._reload is not None:
            self._reload.waiting.discard(pid)
            self._reload.loaded.discard(pid)

    def _replace(self, worker: Worker) -> None:
        """Drain ``worker`` and start one on the current version in its place."""
        self._terminate(worker)
        self._fork(worker.slot)

    def _terminate(self, worker: Worker) -> None:
        worker.stopping = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)

    def _kill_stragglers(self) -> None:
        """SIGKILL a worker that was told to stop and has not, past its drain's time."""
        limit = self.settings.shutdown_timeout_s + KILL_GRACE_S
        for worker in self.workers.values():
            if worker.stopping is not None and time.monotonic() - worker.stopping > limit:
                log.error("worker %d did not stop in time: killing it", worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def _send(self, worker: Worker, message: Message) -> None:
        """Send an order or an answer; a worker that cannot take it (its channel full
        for SEND_TIMEOUT_S: it is stuck) is replaced, and the reaper sees a dying one."""
        try:
            worker.control.sendall(encode(message))
        except TimeoutError:
            if worker.stopping is None:
                log.error("worker %d does not read its orders: replacing it", worker.pid)
                self._replace(worker)
        except OSError:
            pass

    def _read(self, worker: Worker) -> None:
        try:
            data = worker.control.recv(65536)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data:  # its end closed: it is exiting
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.control)
            return
        worker.buffer += data
        for message in decode_lines(worker.buffer):
            self._on_message(worker, message)

    def _on_message(self, worker: Worker, message: Message) -> None:
        op = message["op"]
        if op == "ready":
            worker.ready = self._ever_ready = True
        elif op == "reload":
            ref = message["ref"]
            directory = self.settings.model_dir
            if message["model_dir"] is not None:
                directory = Path(message["model_dir"])

            def answer(status: int, body: dict[str, Any], pid: int = worker.pid) -> None:
                target = self.workers.get(pid)
                if target is not None:
                    self._send(target, {"op": "reloaded", "ref": ref, "status": status, **body})

            self._request_reload(directory, answer)
        elif op in ("loaded", "load_failed", "swapped"):
            self._on_reload_answer(worker, message)

    # -- reloads

    def _prepare(self, directory: Path) -> Prepared:
        return prepare_checkpoint(directory, self.run_dir, tables=self.settings.tables_in_process)

    def _request_reload(
        self, directory: Path, answer: Callable[[int, dict[str, Any]], None]
    ) -> None:
        self._queued.append((directory, answer))
        self._next_reload()

    def _next_reload(self) -> None:
        """Start the next queued reload, unless one is under way."""
        while self._reload is None and self._queued and not self._stopping:
            directory, answer = self._queued.pop(0)
            assert self.current is not None
            if not (directory / SPEC_FILE).is_file():
                log.error("reload refused: no checkpoint at %s", directory)
                self.metrics.reloads.labels("failed").inc()
                answer(404, {"detail": f"no checkpoint at {directory} (no {SPEC_FILE})"})
                continue
            try:
                prepared = self._prepare(directory)
            except Exception as exc:  # (a malformed checkpoint may fail in other ways)
                if not isinstance(exc, CheckpointError | OSError):
                    exc = CheckpointError(f"{directory}: does not load: {exc!r}")
                log.error("reload refused, still serving %s: %s", self.current.version, exc)
                self.metrics.reloads.labels("failed").inc()
                answer(422, {"detail": str(exc)})
                continue
            if not any(worker.stopping is None for worker in self.workers.values()):
                answer(503, {"detail": "no worker is serving (they are restarting): retry"})
                continue
            reload = Reload(next(self._ids), directory, answer, prepared, self.current)
            self._begin(reload, "load", {"prepared": prepared.to_json()})

    def _begin(self, reload: Reload, phase: str, extra: dict[str, Any]) -> None:
        reload.phase = phase
        serving = {pid for pid, worker in self.workers.items() if worker.stopping is None}
        reload.waiting = set(reload.loaded) if phase == "swap" else serving
        reload.deadline = time.monotonic() + self.settings.reload_timeout_s
        self._reload = reload
        for pid in list(reload.waiting):
            self._send(self.workers[pid], {"op": phase, "id": reload.id, **extra})
        self._check_reload()

    def _on_reload_answer(self, worker: Worker, message: Message) -> None:
        reload = self._reload
        if reload is None or message["id"] != reload.id or worker.pid not in reload.waiting:
            return  # (a late answer to a reload that ended)
        reload.waiting.discard(worker.pid)
        if message["op"] == "loaded":
            reload.loaded.add(worker.pid)
        elif message["op"] == "load_failed":
            reload.refusal = reload.refusal or (message["status"], message["detail"])
        elif message["op"] == "swapped":
            worker.prepared = reload.prepared
        self._check_reload()

    def _check_reload(self) -> None:
        """Move the reload under way on, once every worker answered or time is up."""
        reload = self._reload
        if reload is None:
            return
        late = reload.waiting if time.monotonic() >= reload.deadline else set()
        if reload.waiting and not late:
            return
        reload.waiting = set()
        if reload.phase == "load" and reload.refusal is not None:
            for pid in reload.loaded:
                self._send(self.workers[pid], {"op": "discard", "id": reload.id})
            for pid in late:  # stuck in a load nobody will swap: restarted on the old one
                self._replace(self.workers[pid])
            status, detail = reload.refusal
            log.error("reload refused, still serving %s: %s", reload.replaced.version, detail)
            self._end(reload, status, {"detail": detail})
            return
        # From here on the new version is the server's: whoever starts, starts on it.
        self.current = reload.prepared
        for pid in late:
            log.error(
                "worker %d did not %s %s within %ss: replacing it",
                pid,
                reload.phase,
                reload.prepared.version,
                self.settings.reload_timeout_s,
            )
            reload.loaded.discard(pid)
            reload.late.add(pid)
            self._replace(self.workers[pid])
        if reload.phase == "load":
            self._begin(reload, "swap", {})
            return
        # Workers started while the reload ran started on the version before it.
        for worker in list(self.workers.values()):
            if worker.stopping is None and worker.prepared.version != reload.prepared.version:
                self._replace(worker)
        if reload.late:
            detail = (
                f"workers {sorted(reload.late)} did not switch to {reload.prepared.version} "
                f"within {self.settings.reload_timeout_s}s; they are replaced by workers "
                "serving it"
            )
            self._end(reload, 504, {"detail": detail})
            return
        log.info(
            "reloaded: %d workers serve %s from %s",
            len(reload.loaded),
            reload.prepared.version,
            reload.directory,
        )
        body = {
            "model_version": reload.prepared.version,
            "previous_version": reload.replaced.version,
            "workers": len(reload.loaded),
        }
        self._end(reload, 200, {"body": body})

    def _end(self, reload: Reload, status: int, body: dict[str, Any]) -> None:
        self._reload = None
        # The files of the version no longer served (workers that map them keep them).
        assert self.current is not None
        dropped = reload.prepared if self.current is reload.prepared else reload.replaced
        if dropped.version != self.current.version:
            for path in (dropped.index, dropped.weights):
                if path is not None:
                    path.unlink(missing_ok=True)
        self.metrics.reloads.labels("ok" if status in (200, 504) else "failed").inc()
        reload.answer(status, body)
        self._next_reload()


def listen(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address (SO_REUSEPORT), one per worker slot.

    The kernel spreads new connections over them evenly. One socket shared by every
    worker would not: whichever worker wakes first accepts every connection waiting
    (asyncio accepts up to its backlog at a time), so 64 keep-alive connections
    opened at once land on one worker. The supervisor keeps each slot's socket
    across worker replacements: connections that arrive while a slot's worker
    restarts wait in its backlog for the replacement, and none is reset.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_server((host, port), backlog=2048, reuse_port=True)
            sock.set_inheritable(True)
            sockets.append(sock)
            port = sock.getsockname()[1]  # (port 0: every slot on the port the first got)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _log_outcome(status: int, body: dict[str, Any]) -> None:
    """A SIGHUP reload's answer goes to nobody: the log has it already."""


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"
