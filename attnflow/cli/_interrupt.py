"""Ctrl-C (SIGINT) and SIGTERM in the ``attnflow`` command: stop at any moment, in one line, without a crash.

Python runs signal handlers only in the main thread, between bytecodes. While that thread sits in a long native call
(XLA compiling the first program takes seconds) a signal waits, and a ``KeyboardInterrupt`` raised inside JAX leaves
it half torn down: a crash at exit, or a run that carries on. So :func:`call` runs a command in a worker thread while
the main thread only waits for it and writes what it prints; the SIGINT and SIGTERM handlers print one line on stderr
and leave at once with ``os._exit(128 + signal)`` (130, 143), with no interpreter teardown under a running compile.

What finished is kept: every file of a run directory is written atomically (a temporary name, then a rename), the
directory's lock (``flock``) is released by the kernel when the process ends, this process's own temporary files in
``--out`` are removed, and child processes (``attnflow bench`` runs its suite in one) get SIGTERM. Everything the
worker prints on stdout is handed to the main thread, which writes it: a signal that arrives during such a write waits
until it is done, so a JSON document is never cut in the middle (a second signal does not wait).

This module imports the standard library only: :func:`guard_startup` runs first thing while ``attnflow`` is imported
(JAX loads for a second or two), and only in the attnflow command's own process (``python -m attnflow`` or the
``attnflow`` script); a library import changes no handler.
"""

from __future__ import annotations

import contextvars
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.1
"""Longest wait of the main thread between two looks at pending signals (a signal delivered to another thread, e.g.
one of XLA's, wakes no one: the main thread sees it when its wait times out)."""


class _State:
    command: str | None = None  # the subcommand, for the message
    out: str | None = None  # its --out, to name a resumable run directory and remove this process's temporary files
    cli_process = False  # this process is the attnflow command: the handlers stay until it ends
    writing = 0  # the main thread is writing the worker's stdout: a signal waits until the write is done
    deferred: int | None = None  # that signal
    exiting = False  # _die has begun (a second signal must not start it again: its line would go to /dev/null)


_state = _State()


# ------------------------------------------------------------------------------------------------ the exit
def message(signum: int) -> str:
    """The one line printed on a signal: the command, the signal, and for a run directory what to do next."""
    name = signal.Signals(signum).name
    line = f"attnflow{' ' + _state.command if _state.command else ''}: interrupted ({name})"
    out = _state.out
    if out and os.path.isfile(os.path.join(out, "manifest.json")) and os.path.isdir(os.path.join(out, "chunks")):
        line += f"; finished chunks are kept in {out}, continue with --resume"  # (no count: more may finish until the exit)
    return line


def _die(signum: int) -> None:
    """Print the one line, stop child processes, remove this process's temporary files, and leave with 128 + signum."""
    if _state.exiting:
        return
    _state.exiting = True
    err = 2
    try:
        err = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)  # from now on nothing else reaches stderr or stdout: not the worker, XLA or a progress bar
        os.dup2(null, 1)
    except OSError:
        pass
    _stop_children()
    # The worker runs on until the exit (its native code does not wait for the GIL): the temporary files go last.
    try:
        line = message(signum)
    except (OSError, ValueError, KeyError):  # an unreadable --out or argument: the line without it
        line = f"attnflow: interrupted ({signal.Signals(signum).name})"
    try:
        data = (("\n" if os.isatty(err) else "") + line + "\n").encode(errors="replace")
        while data:
            data = data[os.write(err, data):]
    except OSError:
        pass
    _remove_own_temporaries(_state.out)
    os._exit(128 + signum)


def _children() -> list[int]:
    """Process ids of this process's children (those of every thread)."""
    me, kids = os.getpid(), []
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
        return kids
    except OSError:  # no /proc/PID/task/TID/children: scan every process's parent
        pass
    try:
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            kids.append(int(p))
                except (OSError, ValueError, IndexError):
                    pass
    except OSError:
        pass
    return kids


def _stop_children() -> None:
    for pid in _children():
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


def _remove_own_temporaries(out) -> None:
    """Remove the temporary files this process left in ``out`` and ``out/chunks`` (``.NAME.PID.*.tmp``, see
    :func:`attnflow.io.results.atomic_write_bytes`): a write cut short by the exit. Other processes' are left alone."""
    if not out:
        return
    tag = f".{os.getpid()}."
    for d in (out, os.path.join(out, "chunks")):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if n.startswith(".") and n.endswith(".tmp") and tag in n:
                try:
                    os.unlink(os.path.join(d, n))
                except OSError:
                    pass


def _handler(signum, frame):
    if _state.writing and _state.deferred is None:
        _state.deferred = signum  # the main thread is writing output: finish that write first
        return
    _die(signum)


def _install() -> dict:
    """Install the handlers (main thread only); a signal ignored by whoever started us (``nohup``, ``cmd &``) stays
    ignored. Returns the handlers replaced."""
    previous = {}
    for s in SIGNALS:
        old = signal.getsignal(s)
        if old is signal.SIG_IGN or old is _handler:
            continue
        signal.signal(s, _handler)
        previous[s] = old
    return previous


def _restore(previous: dict) -> None:
    for s, old in previous.items():
        if old is not None:
            signal.signal(s, old)


# ----------------------------------------------------------------------------------------- at start-up
def _module_run() -> str | None:
    """The module this interpreter was started to run with ``-m`` (None when it was not)."""
    argv = list(getattr(sys, "orig_argv", None) or [])
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-W", "-X", "--check-hash-based-pycs"):  # options that take a value
            i += 2
            continue
        if a.startswith(("-W", "-X")) or a.startswith("--") and a != "--":
            i += 1
            continue
        if a.startswith("-") and len(a) > 1:
            flags = a[1:]
            for j, f in enumerate(flags):
                if f == "m":
                    rest = flags[j + 1:]
                    return rest or (argv[i + 1] if i + 1 < len(argv) else None)
                if f == "c":
                    return None
            i += 1
            continue
        return None  # a script, "-" or "--": not -m
    return None


def is_cli_process() -> bool:
    """Whether this interpreter was started as the attnflow command (``python -m attnflow ...`` or ``attnflow ...``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 == "-m":  # python -m X, while X's package is imported
        return _module_run() == "attnflow"
    return os.path.basename(argv0).removesuffix(".exe") == "attnflow"


def _context_from_argv(argv) -> None:
    """The command and its --out from the raw arguments (before they are parsed)."""
    argv = list(argv)
    _state.command = next((a for a in argv if not a.startswith("-")), None)
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            _state.out = argv[i + 1]
        elif a.startswith("--out="):
            _state.out = a[len("--out="):]


def guard_startup() -> None:
    """In the attnflow command's own process, install the SIGINT/SIGTERM handlers now, before JAX is imported; in
    any other process (a library import, a test, a notebook) do nothing."""
    if _state.cli_process or threading.current_thread() is not threading.main_thread() or not is_cli_process():
        return
    _state.cli_process = True
    _context_from_argv(sys.argv[1:])
    _install()


# ------------------------------------------------------------------------------------ running a command
class _Relay:
    """``sys.stdout`` while a command runs in the worker: its writes are queued and written by the main thread (which
    may hold a signal until a write is done); ``flush`` returns once the main thread has written everything before it.
    Writes from the main thread go straight through."""

    def __init__(self, real):
        self.real = real
        self._cond = threading.Condition()
        self._chunks: list[str] = []
        self._queued = 0  # chunks queued so far
        self._written = 0  # chunks written so far
        self._done = False
        self._error: OSError | None = None
        self._main = threading.main_thread()
        self._through = False  # after the call: every write goes straight through (a thread that kept this object)

    def __getattr__(self, name):  # encoding, errors, fileno, buffer, ...: the real stream's
        return getattr(self.real, name)

    def isatty(self) -> bool:
        return self.real.isatty()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if self._through or threading.current_thread() is self._main:
            return self.real.write(s)
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self._error is not None:
            raise self._error
        with self._cond:
            self._chunks.append(s)
            self._queued += 1
            self._cond.notify_all()
        if "\n" in s and getattr(self.real, "line_buffering", False):
            self.flush()  # a terminal sees each line when it is printed, in order with stderr
        return len(s)

    def flush(self) -> None:
        if self._through or threading.current_thread() is self._main:
            self.real.flush()
            return
        with self._cond:
            target = self._queued
            self._cond.notify_all()
            while self._written < target and self._error is None:
                self._cond.wait()
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """The worker is done."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _write_out(self, text: str) -> None:
        """Write `text` completely. To a file descriptor with ``os.write`` in a loop: Python 3.11's buffered writer
        loses the rest of a large write to a pipe that a signal handler interrupted."""
        real = self.real
        try:
            fd = real.fileno() if os.name == "posix" else None
        except (AttributeError, OSError, ValueError):  # a StringIO, pytest's capture
            fd = None
        if fd is None:
            real.write(text)
            real.flush()
            return
        real.flush()
        data = memoryview(text.encode(getattr(real, "encoding", None) or "utf-8", getattr(real, "errors", None) or "strict"))
        while data:
            data = data[os.write(fd, data):]

    def pump(self) -> None:
        """In the main thread until the worker is done: write what it printed, a batch at a time."""
        while True:
            with self._cond:
                if not self._chunks and not self._done:
                    self._cond.wait(POLL_S)
                chunks, self._chunks = self._chunks, []
                upto, done = self._queued, self._done
            if chunks and self._error is None:
                _state.writing += 1
                try:
                    self._write_out("".join(chunks))
                except OSError as e:  # a closed pipe (| head) or a full disk: the worker's next write raises it
                    self._error = e
                finally:
                    _state.writing -= 1
                if _state.deferred is not None:
                    _die(_state.deferred)
            with self._cond:
                self._written = upto
                self._cond.notify_all()
            if done and not chunks:
                return


def _thread_x64():
    """The calling thread's ``jax.enable_x64(...)`` override, when it has one (None otherwise: the worker then
    follows the global setting, which the command itself may change for a float64 config)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    here, seen = bool(jax.config.jax_enable_x64), []
    probe = threading.Thread(target=lambda: seen.append(bool(jax.config.jax_enable_x64)))  # a new thread: the global
    probe.start()
    probe.join()
    return here if seen and seen[0] != here else None


def call(fn, *, command: str | None = None, out=None):
    """``fn()`` with SIGINT and SIGTERM stopping it at any moment (see the module's docstring); returns its value
    and raises its exception (a traceback still shows where it was raised).

    In the main thread ``fn`` runs in a worker thread, and the handlers are installed for the call (and kept for the
    rest of the process when it is the attnflow command, so that a signal during its exit is handled the same way).
    In any other thread, ``fn`` runs right there and no handler is touched."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    _state.command, _state.out = command, None if out is None else os.fspath(out)
    _state.deferred = None
    previous = _install()
    relay = _Relay(sys.stdout)
    box: dict = {}
    ctx = contextvars.copy_context()  # the caller's context (NumPy error state, ...) holds in the worker too
    x64 = _thread_x64()  # and so does JAX's thread-local x64 switch (jax.enable_x64), which threads do not inherit

    def work():
        try:
            if x64 is None:
                box["value"] = ctx.run(fn)
            else:
                import jax

                with jax.enable_x64(x64):
                    box["value"] = ctx.run(fn)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            box["error"] = e
        finally:
            relay.finish()

    sys.stdout = relay
    try:
        worker = threading.Thread(target=work, name=f"attnflow {command or ''}".strip(), daemon=True)
        worker.start()
        relay.pump()
        worker.join()  # its last native calls end before the exit does (the interpreter aborts under them)
    finally:
        relay._through = True
        if sys.stdout is relay:
            sys.stdout = relay.real
        if not _state.cli_process:
            _restore(previous)
    if "error" in box:
        raise box["error"]
    return box["value"]
