"""Real database servers for tests: Debian's PostgreSQL and Redis, started on 127.0.0.1 on a free port in a
temporary folder and stopped by their own PID. ``make test`` installs the packages once (``make services``).

PostgreSQL refuses to run as root: as root its programs run as the `postgres` user (Debian's package makes it)
in a folder that user owns; otherwise they run as the current user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str = "postgres") -> Any:
        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname)

    def create_database(self) -> str:
        """A fresh database in this server; returns its name."""
        name = f"boostqa_{uuid.uuid4().hex[:8]}"
        con = self.connect()
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        con.close()
        return name


def _postgres_bindir() -> Path | None:
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if not found:
        return None
    newest = max(found, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(newest).parent


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.fail(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin: run `make services` (installs Debian's `postgresql`; "
            "`make test` does it) or deselect these tests with -m 'not postgres'"
        )
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="boostqa-pg-"))
    data = root / "data"
    password = uuid.uuid4().hex
    (root / "pwfile").write_text(password + "\n")
    if as_root:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(root / "pwfile", "postgres", "postgres")
    subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "dagster",
            f"--pwfile={root / 'pwfile'}",
            "--auth=scram-sha-256",
            "--no-locale",
            "--encoding=UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    server = None
    for _ in range(3):  # another process may take the free port between free_port() and the bind
        port = free_port()
        # Test-only settings: TCP on 127.0.0.1 only, the socket in our folder, no fsync (a throwaway database).
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options]
        started = subprocess.run([*pg_ctl, "-w", "-t", "60", "start"], capture_output=True, text=True)
        if started.returncode == 0:
            server = PostgresServer("127.0.0.1", port, "dagster", password)
            break
    log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
    assert server is not None, f"PostgreSQL did not start: {started.stderr}\n{log}"
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        yield server
    finally:
        stopped = subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"],
            capture_output=True,
        )
        if stopped.returncode != 0:  # pg_ctl could not stop it: kill the postmaster we started, by its PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM exactly this PID, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """A Redis server (Debian's `redis-server`) on 127.0.0.1, no persistence; yields its ``redis://`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "no redis-server: run `make services` (installs Debian's `redis-server`; `make test` does it) or "
            "deselect these tests with -m 'not redis'"
        )
    root = Path(tempfile.mkdtemp(prefix="boostqa-redis-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # another process may take the free port first
            port = free_port()
            args = ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(root), "--save", "", "--appendonly", "no"]
            proc = subprocess.Popen(
                [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None and not _redis_answers(port):
                time.sleep(0.05)
            if proc.poll() is None and _redis_answers(port):
                break
            _stop(proc)
            proc = None
        assert proc is not None, "redis-server did not start"
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
