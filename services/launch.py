"""Start servers from Python: in a child process (as `retrogram serve SERVICE` runs them) or on a
background thread of this process. Used by `retrogram serve` for the stack, the tests and the benches."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from ..index.errors import UserError


def retrogram_command(*args: str) -> list[str]:
    """The argv that runs `retrogram ARGS...` with this interpreter. `-P` keeps the working directory off
    sys.path, so a process started from the repository root imports the installed packages, not the
    top-level folders (see kernels/_bare_name.py)."""
    return [sys.executable, "-P", "-m", "retrogram.services.cli", *args]


class ServerProcess:
    """`retrogram serve SERVICE --index DIR --port P` in a child process, its stdout events read on a thread.
    index_dir None: no --index (a service that needs none, such as the decoder)."""

    def __init__(self, service: str, index_dir: Path | str | None, port: int = 0, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = (), env: dict | None = None, capture_stderr: bool = True):
        self.service = service
        index = [] if index_dir is None else ["--index", str(index_dir)]
        self.argv = retrogram_command("serve", service, *index, "--port", str(port), "--host", host,
                                      *map(str, extra_args))
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE if capture_stderr else None, text=True, env=e,
                                     start_new_session=True)
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if self.proc.stderr is not None:
            threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "exited"})
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.stderr_lines.append(line.rstrip("\n"))

    @property
    def stderr_text(self) -> str:
        with self._cond:
            return "\n".join(self.stderr_lines)

    def wait_event(self, names: set[str] | str, timeout: float = 120) -> dict | None:
        names = {names} if isinstance(names, str) else names
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if ev.get("event") in names:
                        return ev
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.2))

    def wait_serving(self, timeout: float = 120) -> "ServerProcess":
        ev = self.wait_event({"serving", "failed", "exited"}, timeout)
        if ev is None or ev["event"] != "serving":
            self.stop(kill=True)
            raise UserError(f"{self.service} server did not start: {ev.get('error') if ev else 'timeout'}\n"
                            f"{self.stderr_text[-4000:]}")
        return self

    @property
    def address(self) -> str:
        ev = self.wait_event("listening", 0)
        if ev is None:
            raise RuntimeError("the server is not listening yet")
        return ev["address"]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30, kill: bool = False) -> int:
        self.signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ThreadServer:
    """A server on a background thread of this process, with its own event loop (for tests and benches
    that want no process start-up). `stop()` drains it like SIGTERM does."""

    def __init__(self, services: list, config=None):
        from .serving import ServeConfig, Server, validate_config

        self.config = config or ServeConfig()
        validate_config(self.config)
        for s in services:
            s.check()
        self.services = services
        self._server = Server(services, self.config)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="retrogram-server")
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._server.start())
        except BaseException as e:  # noqa: BLE001
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def load(self, wait: bool = True) -> "ThreadServer":
        """Load the services' resources (health SERVING once done); wait=False returns at once."""
        self.loading = asyncio.run_coroutine_threadsafe(self._server.load(), self._loop)
        if wait:
            self.loading.result()
        return self

    @property
    def in_flight(self) -> int:
        """Calls the server is answering now."""
        return self._server.in_flight

    @property
    def address(self) -> str:
        return self._server.address

    @property
    def port(self) -> int:
        return self._server.port

    def stop(self, grace: float | None = None) -> None:
        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        fut.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(0)
