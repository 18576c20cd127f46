"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary directory, a server on a free loopback
port, one fresh database per test, everything removed at the end.

The binaries come from Debian's `postgresql` package (.ci/run installs it); without them the PostgreSQL half
of the parametrised tests skips and says why. PostgreSQL refuses to run as root, so under root the cluster
runs as the package's `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned directories (newest)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """One running server; `new_database()` gives each test its own empty database."""

    def __init__(self, bindir: Path, root: Path, user: str | None) -> None:
        self.bindir, self.root, self.user = bindir, root, user
        self.data = root / "data"
        self.port = _free_port()
        self._databases: list[str] = []

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        # Loopback only; fsync off: a test cluster trades durability for speed (never do this for real).
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "start", timeout=90)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """An empty registry database for one test; returns its SQLAlchemy URL.

        One database, emptied between tests (dropping and recreating its schema takes milliseconds; CREATE
        DATABASE takes a second or more on a loaded machine). Tests run one at a time, so that is isolation
        enough; the engines cached in this process for the URL keep working (their connections are idle)."""
        if not self._databases:
            self._admin('CREATE DATABASE "eas_test"')
            self._databases.append("eas_test")
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/eas_test", autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
            conn.execute("CREATE SCHEMA public")
        return self.url("eas_test")

    def drop_databases(self) -> None:
        while self._databases:
            name = self._databases.pop()
            with contextlib.suppress(Exception):
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Start a cluster (pytest.skip with the reason when that is impossible) and remove it afterwards."""
    bindir = _binaries()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian package `postgresql`; .ci/run installs it as root)")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="eas-pg-"))  # not under pytest's 0700 tmp: the postgres user reads it
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = PostgresCluster(bindir, root, user)
    try:
        try:
            cluster.start()
        except subprocess.CalledProcessError as exc:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}\n{log[-2000:]}")
        yield cluster
    finally:
        cluster.stop()
        # Give the server a moment to release its files before removing them.
        time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)


# --- fixtures (imported by tests/conftest.py, so every folder shares one cluster per session) ------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster]:
    with postgres_cluster() as cluster:
        yield cluster
        cluster.drop_databases()


def use_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str) -> str | None:
    """Point every store this test opens (and every process it starts) at `backend`'s registry through
    $EAS_REGISTRY_URL: a fresh PostgreSQL database, or unset for the store's own SQLite file. Returns the URL."""
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_server").new_database()
        monkeypatch.setenv("EAS_REGISTRY_URL", url)
        return url
    monkeypatch.delenv("EAS_REGISTRY_URL", raising=False)
    return None
