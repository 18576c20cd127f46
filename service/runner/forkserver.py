"""Model processes and conversion workers forked from a process that has already imported what they need
(Settings.forkserver; docs/serving.md, "The model process").

Why: a model process started afresh (`python -m service.runner.process_main`) spends ~5 s of the 2-core machine
importing torch, transformers and the project before it loads a weight (`python -X importtime`), and pays it
again at every start: the second variant's, each hot activation's and the one that replaces a dead child. The
fork server pays it once: it is started the first time a model process is needed, imports
`service.runner.process` (so torch and transformers) and then forks one model process per request, which goes
straight to loading. A conversion job's worker (`python -m service.admin.worker`) is forked the same way
(`fork_module`), in a session of its own as the plain start gives it.

- **Nothing runs before a fork that a fork would break**: the fork server never runs a torch operation (so
  OpenMP has no thread pool yet) and runs one thread (its import watchdog is stopped and joined first).
- **What a fork takes from the server**: the server's environment, working directory and CPU affinity at the
  moment of the request (the child applies them before it loads). What the fork server's imports already
  read cannot change that way (OpenMP and torch read variables such as OMP_WAIT_POLICY when they load), so a
  fork server serves only requests whose executable, import path, niceness and environment (EAS_* variables
  and PYTEST_CURRENT_TEST aside) equal its own; a request that differs starts another (at most
  MAX_SERVERS, then the plain start).
- **Lifetimes**: a forked model process watches the server process itself (a pidfd, inherited from the fork
  server) and exits the moment it is gone, kill -9 included; so does the fork server, which also exits when
  the server closes its socket. A forked worker gets that pidfd in $EAS_SERVER_PIDFD for its own watchdog
  (service/admin/worker.py), which records its job failed first. The fork server, not the server, is the
  forked process's parent: it reaps a child when the server asks for its exit status (`ForkedProcess.poll`),
  so the server still reports how its model process or worker ended (a -9 is usually the kernel's
  out-of-memory killer). A Ctrl-C meant for the server is ignored by the fork server.
- **Falling back**: any failure of the fork server (it cannot start, dies, or does not answer within
  FORK_TIMEOUT_S) is logged and the process is started the plain way; a fork server that failed is not
  asked again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

FORK_TIMEOUT_S = 300.0  # the first request waits for the fork server's imports (~5 s here; a slow disk more)
MAX_SERVERS = 3
EXIT_UNKNOWN = 255  # a forked process whose fork server is gone: its exit status went with it
_HEADER = struct.Struct("!I")


# Variables no import reads, so that a fork server serves requests whatever their values (the fork applies them):
# the service's own settings, and the name of the running test that pytest sets in the environment.
_NOT_READ_BY_IMPORTS = ("EAS_", "PYTEST_CURRENT_TEST")


def _environment_key(environ: dict[str, str] | None = None) -> tuple[Any, ...]:
    """What a fork server's imports may have read and a fork cannot change (see the module docstring)."""
    variables = os.environ if environ is None else environ
    kept = tuple(sorted((k, v) for k, v in variables.items() if not k.startswith(_NOT_READ_BY_IMPORTS)))
    return sys.executable, tuple(sys.path), os.getpriority(os.PRIO_PROCESS, 0), kept


def _readable(fd: int, timeout: float | None) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _send_message(sock: socket.socket, message: Any, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = _HEADER.pack(len(payload)) + payload
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes:
    data = b""
    while len(data) < n:
        if fds is not None and not data:
            chunk, got, _flags, _addr = socket.recv_fds(sock, n, 4)
            fds.extend(got)
        else:
            chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the other end of the fork server's socket closed")
        data += chunk
    return data


def _recv_message(sock: socket.socket, fds: list[int] | None = None) -> Any:
    header = _recv_exact(sock, _HEADER.size, fds)
    (size,) = _HEADER.unpack(header)
    return pickle.loads(_recv_exact(sock, size))


# --- in the server -------------------------------------------------------------------------------------

class ForkServerError(RuntimeError):
    """The fork server did not fork: the caller starts the process the plain way."""


class ForkedProcess:
    """A process forked by a fork server, with the part of subprocess.Popen's interface that ProcessRunner and
    the job supervisor use (pid, poll, wait, kill). It is not the server's child, so it is watched through a
    pidfd, and its exit status comes from the fork server that reaps it."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._server = server
        self._pidfd: int | None = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and self._pidfd is not None and _readable(self._pidfd, 0):
            self._exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._pidfd is not None:
            if not _readable(self._pidfd, timeout):
                raise subprocess.TimeoutExpired(f"model process {self.pid}", timeout or 0.0)
            self._exited()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _exited(self) -> None:
        self.returncode = self._server.exit_status(self.pid)
        self._close()

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close()


class ForkServer:
    """One fork server process, started by the constructor; `fork` is safe from several threads."""

    def __init__(self, environ: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        path = os.pathsep.join(p or os.getcwd() for p in sys.path)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.runner.forkserver", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), env={**environ, "PYTHONPATH": path}, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        self.failed = False

    def fork(self, target: tuple[Any, ...], fds: list[int], environ: dict[str, str]) -> ForkedProcess:
        """A forked process running `target` (see `_child`) on these descriptors, with this environment and the
        caller's working directory and CPU affinity."""
        request = {"target": target, "environ": environ, "cwd": os.getcwd(), "affinity": _affinity()}
        pid = self._ask(("fork", request), fds)
        if not isinstance(pid, int):
            self._fail(f"it answered {pid!r} to a fork")
        try:
            return ForkedProcess(self, pid)
        except OSError as exc:  # no pidfd for it: it cannot be watched, so it must not run
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            self._fail(f"the forked process {pid} cannot be watched: {exc!r}")
            raise  # unreachable: _fail raises

    def exit_status(self, pid: int) -> int:
        """How a forked process that has exited ended (Popen's returncode convention: -N for signal N)."""
        try:
            status = self._ask(("status", pid))
        except ForkServerError:
            return EXIT_UNKNOWN
        return status if isinstance(status, int) else EXIT_UNKNOWN

    def _ask(self, message: Any, fds: list[int] = ()) -> Any:  # type: ignore[assignment]
        with self._lock:
            if self.failed:
                raise ForkServerError("the fork server failed before")
            try:
                _send_message(self._sock, message, fds)
                if not _readable(self._sock.fileno(), FORK_TIMEOUT_S):
                    self._fail(f"it did not answer within {FORK_TIMEOUT_S:.0f}s")
                return _recv_message(self._sock)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                self._fail(f"{exc!r} (exit code {self.process.poll()})")

    def _fail(self, why: str) -> None:
        self.failed = True
        self.close()
        raise ForkServerError(f"the model processes' fork server failed: {why}")

    def close(self) -> None:
        """Stop the fork server (the processes it forked go on: they watch the server, not it)."""
        with contextlib.suppress(OSError):
            self._sock.close()
        if self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)


def _affinity() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


_servers: dict[tuple[Any, ...], ForkServer] = {}
_servers_pid = os.getpid()
_servers_lock = threading.Lock()


def prestart() -> None:
    """Start the fork server for this process's environment now, if there is none, without waiting for it: it
    imports while the caller does other work (the service loads its own copy of a model meanwhile)."""
    _server_for(dict(os.environ))


def _server_for(environ: dict[str, str]) -> ForkServer | None:
    """The fork server for this environment, started if there is none; None where there cannot be one (no
    pidfds on this system, MAX_SERVERS already, or this environment's fork server failed)."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return None
    key = _environment_key(environ)
    with _servers_lock:
        global _servers_pid
        if _servers_pid != os.getpid():  # a fork of the server: its parent's fork servers are not its own
            _servers.clear()
            _servers_pid = os.getpid()
        server = _servers.get(key)
        if server is not None and server.failed:
            return None  # this environment's fork server failed: the plain start from now on
        if server is None:
            if len(_servers) >= MAX_SERVERS:
                return None
            try:
                server = _servers[key] = ForkServer(environ)
            except OSError:
                log.warning("could not start a fork server", exc_info=True)
                return None
    return server


def _fork(target: tuple[Any, ...], fds: list[int], environ: dict[str, str]) -> ForkedProcess | None:
    """`target` forked by the fork server for this environment (started on first use), or None: then the
    caller starts the process the plain way (see `_server_for`; a failure of the fork server is logged)."""
    server = _server_for(environ)
    if server is None:
        return None
    try:
        return server.fork(target, fds, environ)
    except (ForkServerError, OSError) as exc:
        log.warning("%s; starting the process without it", exc)
        return None


def fork_model_process(conn_fd: int, flags_fd: int) -> ForkedProcess | None:
    """A model process (`child_main` on its socket and cancel flags) from the fork server, or None."""
    return _fork(("model",), [conn_fd, flags_fd], dict(os.environ))


def fork_module(module: str, args: list[str], *, environ: dict[str, str], output_fd: int) -> ForkedProcess | None:
    """`python -m MODULE ARGS...` from the fork server, in a session (and process group) of its own, with this
    environment, stdin from /dev/null and stdout and stderr to `output_fd`; or None. The forked module finds
    the server's pidfd in $EAS_SERVER_PIDFD (its parent is the fork server, not the server)."""
    return _fork(("module", module, list(args)), [output_fd], environ)


def close_all() -> None:
    """Stop every fork server this process started (tests; at exit they stop on their own)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()


# --- the fork server process ----------------------------------------------------------------------------

def _watch_parent_while_importing(parent: int, done: threading.Event) -> threading.Thread:
    """Until `done`: exit when the server is gone (imports take seconds, and a server killed meanwhile must not
    leave this process behind)."""
    def watch() -> None:
        while not done.wait(0.2):
            if os.getppid() != parent:
                os._exit(0)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def _exit_with_server(server_pidfd: int) -> None:
    """In a forked model process: exit the moment the server process is gone."""
    def watch() -> None:
        _readable(server_pidfd, None)
        os._exit(0)

    threading.Thread(target=watch, name="server-watchdog", daemon=True).start()


def _name(name: str) -> None:
    """What `ps -o comm`, top and psutil call this process (a fork keeps the fork server's command line)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def _child(control: socket.socket, server_pidfd: int, request: dict[str, Any], fds: list[int],
           started: int) -> None:
    """The forked process: become what the request asks for, then exit (never return to the fork server's
    loop). `started` is written to once the process is in its own session, if it asked for one."""
    code = 1
    try:
        _name("eas-model" if request["target"][0] == "model" else "eas-" + request["target"][1].rsplit(".", 1)[-1])
        control.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        target = request["target"]
        if target[0] == "module":
            os.setsid()  # before the server hears the pid: it may signal the process group at once
        os.write(started, b"s")
        os.close(started)
        os.environ.clear()
        os.environ.update(request["environ"])
        os.chdir(request["cwd"])
        if request["affinity"] is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, request["affinity"])
        import random

        # Fresh entropy for the random generators, as a fresh interpreter's: every fork would otherwise draw
        # the fork server's numbers (torch seeds its default generator anew in each process, too).
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        if target[0] == "model":
            _exit_with_server(server_pidfd)
            from multiprocessing.connection import Connection

            from service.runner.process import child_main

            child_main(Connection(fds[0]), fds[1])
            code = 0
        else:
            code = _run_module(target[1], target[2], fds[0], server_pidfd)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_module(module: str, args: list[str], output_fd: int, server_pidfd: int) -> int:
    """`python -m module args...` in this process, as the plain start would run it; its exit code."""
    import runpy

    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    for fd in (1, 2):
        os.dup2(output_fd, fd)
    os.close(output_fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  (a log file: lines as they come)
    os.environ["EAS_SERVER_PIDFD"] = str(server_pidfd)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def _status(pid: int) -> int | None:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def serve(control: socket.socket, server: int) -> None:
    """The fork server's loop: fork on request, report exit statuses, end with the server."""
    server_pidfd = os.pidfd_open(server)
    if os.getppid() != server:  # the server died before the pidfd was taken: it may name another process now
        return
    while True:
        ready = select.select([control, server_pidfd], [], [])[0]
        if server_pidfd in ready:
            return
        fds: list[int] = []
        try:
            kind, arg = _recv_message(control, fds)
        except (EOFError, OSError):
            return
        if kind == "fork":
            started, child_started = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(started)
                _child(control, server_pidfd, arg, fds, child_started)
            os.close(child_started)
            os.read(started, 1)  # the child is in its own session now, if it asked for one (or already gone)
            os.close(started)
            for fd in fds:
                os.close(fd)
            _send_message(control, pid)
        elif kind == "status":
            _send_message(control, _status(arg))
        else:
            _send_message(control, f"unknown request {kind!r}")


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the server; this ends when the server does
    _name("eas-forkserver")
    control_fd, server = int(argv[1]), int(argv[2])
    done = threading.Event()
    watchdog = _watch_parent_while_importing(server, done)
    import service.runner.process  # noqa: F401  (what every model process needs: torch, transformers, ...)

    done.set()
    watchdog.join()  # one thread from here on: what a fork copies is then consistent
    serve(socket.socket(fileno=control_fd), server)


if __name__ == "__main__":
    main(sys.argv)
