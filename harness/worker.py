"""The harness side of a worker process: an official stack running in its own env (harness/envs.py) and answering
requests over JSON lines on its stdin / stdout (the protocol is in harness/workers/wire.py).

    with Worker([python, script], name="dpg-official") as w:
        result = w.request("answer", {...}, timeout=600)

Images travel as PNG files in a temporary folder (`png_files`), lossless for the uint8 RGB arrays samples hold.
Every failure is a WorkerError (an OSError: one line at the command line, exit 1) naming the worker and saying what
happened: it did not start, it died (exit code and the last lines of its log), it did not answer in time (it is
then killed), it wrote a line that is not JSON or answered another request. A request returns only a complete
answer, so a caller that stores what it returns never stores half of one.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

TIMEOUT_ENV = "HARNESS_WORKER_TIMEOUT"      # seconds one request may take (overrides the caller's)
START_TIMEOUT_ENV = "HARNESS_WORKER_START_TIMEOUT"
MAX_LINE = 256 << 20


class WorkerError(OSError):
    """A worker did not start, died, timed out or broke the protocol."""


def timeout_for(default: float) -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
        if not value > 0:
            raise ValueError(f"${TIMEOUT_ENV} must be > 0, got {raw!r}")
        return value
    return default


class Worker:
    def __init__(self, argv: list[str], *, name: str, start_timeout: float = 300.0, env: dict | None = None,
                 cwd: str | os.PathLike | None = None):
        self.argv, self.name = [str(a) for a in argv], name
        self.start_timeout = timeout_for(start_timeout) if not os.environ.get(START_TIMEOUT_ENV) else \
            float(os.environ[START_TIMEOUT_ENV])
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None
        self.hello: dict = {}
        self._buffer = b""
        self._next_id = 0
        self._log = None

    # --- lifetime ---------------------------------------------------------------------------------------------

    def start(self) -> "Worker":
        if self.alive():
            return self
        self._log = tempfile.TemporaryFile(prefix=f"harness-worker-{self.name}-")
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTHONPATH", None)          # the env's own packages only, never the main venv's
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                         env=env, cwd=self.cwd, start_new_session=True)
        except OSError as e:
            raise WorkerError(f"worker {self.name}: cannot start {self.argv[0]} ({e.strerror or e})") from None
        self._buffer = b""
        hello = self._read(self.start_timeout, "start")
        if not isinstance(hello, dict) or hello.get("ready") is not True:
            self.kill()
            raise WorkerError(f"worker {self.name}: its first line is not the ready message: {str(hello)[:200]}")
        self.hello = hello
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self, wait: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.kill()
        self._release()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)     # its own session: children go too
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._release()

    def _release(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    stream.close()

    def __enter__(self) -> "Worker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 3) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._log.seek(0)
            text = self._log.read()[-20000:].decode("utf-8", "replace")
            kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
            return " | ".join(kept)[-600:]
        return ""

    # --- requests ---------------------------------------------------------------------------------------------

    def request(self, op: str, args: dict, timeout: float) -> object:
        """Send one request and return its result; WorkerError on anything but a complete, matching answer."""
        if not self.alive():
            self.start()
        self._next_id += 1
        rid = self._next_id
        line = json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n"
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._died(f"before request {op!r}") from None
        answer = self._read(timeout_for(timeout), f"request {op!r}")
        if not isinstance(answer, dict) or answer.get("id") != rid or "ok" not in answer:
            self.kill()
            raise WorkerError(f"worker {self.name}: answered request {rid} with {str(answer)[:200]} "
                              f"(not an answer to it); killed")
        if not answer["ok"]:
            raise WorkerError(f"worker {self.name}: {op} failed: {answer.get('error', 'no reason given')}")
        return answer.get("result")

    def _died(self, when: str) -> WorkerError:
        code = self.proc.wait() if self.proc is not None else None
        tail = self.log_tail()
        self._release()
        return WorkerError(f"worker {self.name} died (exit code {code}) {when}"
                           + (f"; its last output: {tail}" if tail else ""))

    def _read(self, timeout: float, what: str) -> object:
        """The next protocol line as JSON, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        stdout = self.proc.stdout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise WorkerError(f"worker {self.name} did not answer {what} within {timeout:g} s; killed "
                                      f"(${TIMEOUT_ENV} sets the limit)")
                if not selector.select(min(left, 1.0)):
                    if self.proc.poll() is not None and b"\n" not in self._buffer:
                        raise self._died(f"during {what}")
                    continue
                chunk = os.read(stdout.fileno(), 1 << 20)
                if not chunk:
                    raise self._died(f"during {what}")
                self._buffer += chunk
                if len(self._buffer) > MAX_LINE:
                    self.kill()
                    raise WorkerError(f"worker {self.name} sent a line over {MAX_LINE >> 20} MiB; killed")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            self.kill()
            text = line.decode("utf-8", "replace").strip()
            raise WorkerError(f"worker {self.name} sent a line that is not JSON during {what}: "
                              f"{text[:120]!r}; killed") from None


# --- a worker per (name, argv), kept for the process's life -----------------------------------------------------

_WORKERS: dict[tuple, Worker] = {}


def shared(argv: list[str], *, name: str, **kwargs) -> Worker:
    """One running worker per command line, started on first use and closed at exit."""
    key = (name, tuple(str(a) for a in argv))
    worker = _WORKERS.get(key)
    if worker is None:
        worker = _WORKERS[key] = Worker(argv, name=name, **kwargs)
    return worker.start()


def close_all() -> None:
    while _WORKERS:
        _, worker = _WORKERS.popitem()
        with contextlib.suppress(Exception):
            worker.close(wait=5)


atexit.register(close_all)


@contextlib.contextmanager
def png_files(images: Iterable[np.ndarray]) -> Iterator[list[str]]:
    """The images as PNG files in a temporary folder, removed afterwards."""
    from PIL import Image
    with tempfile.TemporaryDirectory(prefix="harness-worker-images-") as folder:
        paths = []
        for i, image in enumerate(images):
            path = Path(folder) / f"{i:05d}.png"
            Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG")
            paths.append(str(path))
        yield paths
