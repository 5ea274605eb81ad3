"""The bounded-time client of the sympy worker: `MathChecker.equal(pred, gold)` answers within `timeout_s`.

The choice (see math_worker.py): a long-lived child process, spoken to over pipes with one JSON line per request,
killed when a reply is late and started again on the next request. It works from any thread (the trainer may
score rewards off the main thread, where signal.alarm cannot be used), bounds even GIL-holding C code, and costs
one process start (about a second, not counted against the timeout) per checker, plus one per timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import weakref
from pathlib import Path

WORKER_PATH = Path(__file__).with_name("math_worker.py")
# -c so that the worker's folder is not put on sys.path (its module names must not shadow anything)
_BOOT = "import runpy, sys; sys.path.pop(0); runpy.run_path(sys.argv[1], run_name='__main__')"
_LIVE: weakref.WeakSet[MathChecker] = weakref.WeakSet()


class WorkerError(RuntimeError):
    """The worker died or replied with something unreadable (counted as an error by the reward)."""


class MathChecker:
    """Symbolic answer equivalence in a killable child process.

    Args:
        timeout_s: longest wait for one comparison; on expiry the worker is killed and TimeoutError raised.
        use_math_verify: let the worker try math-verify first when it is importable there.
        startup_timeout_s: longest wait for a new worker to import sympy and report ready.
    """

    def __init__(self, timeout_s: float = 1.0, use_math_verify: bool = True, startup_timeout_s: float = 60.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.use_math_verify = use_math_verify
        self.startup_timeout_s = float(startup_timeout_s)
        self.math_verify_available: bool | None = None  # known once a worker has started
        self.restarts = 0
        self._reset_state()
        _LIVE.add(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._next_id = 0
        self._owner_pid = os.getpid()

    # ------------------------------------------------------------------ worker lifetime
    def _start(self) -> None:
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(WORKER_PATH)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8",
                                bufsize=1)
        replies: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:  # a reader thread, so waiting for a reply can time out portably
            assert proc.stdout is not None
            for line in proc.stdout:
                replies.put(line)
            replies.put(None)

        threading.Thread(target=pump, name="r1forge-math-worker-reader", daemon=True).start()
        self._proc, self._replies = proc, replies
        try:
            line = replies.get(timeout=self.startup_timeout_s)
        except queue.Empty:
            self._kill()
            raise WorkerError(f"math worker did not start within {self.startup_timeout_s:.0f}s") from None
        if line is None:
            self._kill()
            raise WorkerError("math worker exited during start-up (is sympy installed?)")
        self.math_verify_available = bool(json.loads(line).get("math_verify"))

    def _kill(self, restart: bool = True) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self.restarts += int(restart)  # timeouts and crashes; a deliberate close is not a restart
        try:
            proc.kill()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop the worker (a later `equal` starts a new one)."""
        if os.getpid() != self._owner_pid:  # never kill a worker that belongs to the parent of a fork
            self._reset_state()
            return
        if self._lock.acquire(timeout=self.timeout_s + 5):  # never hang (e.g. at exit) behind a stuck request
            try:
                self._kill(restart=False)
            finally:
                self._lock.release()

    # ------------------------------------------------------------------ requests
    def equal(self, pred: str, gold: str) -> bool | None:
        """True/False, None when the answers are not parsable as math; TimeoutError past `timeout_s`;
        WorkerError if the worker dies."""
        if os.getpid() != self._owner_pid:  # forked (e.g. a DataLoader worker): the pipes are the parent's
            self._reset_state()
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill(restart=self._proc is not None)
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            self._next_id += 1
            request = {"id": self._next_id, "pred": pred, "gold": gold, "math_verify": self.use_math_verify}
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError) as exc:
                self._kill()
                raise WorkerError(f"math worker pipe broke: {exc}") from exc
            while True:
                try:
                    line = self._replies.get(timeout=self.timeout_s)
                except queue.Empty:
                    self._kill()
                    raise TimeoutError(f"answer check took longer than {self.timeout_s}s") from None
                if line is None:
                    self._kill()
                    raise WorkerError("math worker exited while checking (out of memory?)")
                reply = json.loads(line)
                if reply.get("id") == self._next_id:
                    break
            if reply.get("error"):
                raise WorkerError(reply["error"])
            return reply.get("equal")


_DEFAULT: MathChecker | None = None
_DEFAULT_LOCK = threading.Lock()


def default_checker() -> MathChecker:
    """The process-wide checker `accuracy_reward` uses (1 s timeout, math-verify when importable)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MathChecker()
        return _DEFAULT


@atexit.register
def _close_all() -> None:
    for checker in list(_LIVE):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            checker.close()
