"""A team MLflow tracking server for tests and benchmarks: PostgreSQL backend store, proxied artifacts, basic-auth.

- `ensure_postgres()`: PostgreSQL answers on 127.0.0.1:5432 as `postgres` with trust auth; when it does not, the
  Debian cluster is started (`pg_ctlcluster`), and when PostgreSQL is not installed at all, Debian's
  `postgresql` package is installed and its cluster set to trust local TCP connections, as on the CI machines.
- `fresh_database(purpose)`: a uniquely named database, dropped (even with open connections) afterwards.
- `mlflow_server(backend_uri, folder, credentials=...)`: `mlflow server` on a free 127.0.0.1 port with
  `--artifacts-destination`, optionally `--app-name basic-auth` with a generated admin password; stopped (the
  whole process group) when the block ends.
- `team_server`: the session fixture combining them; test modules import it.

SQLAlchemy 2.1 maps a bare `postgresql://` URI to psycopg 3, so the backend URI names the psycopg2 driver that the
test extra installs: `postgresql+psycopg2://postgres@127.0.0.1:5432/<db>`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
SERVER_START_TIMEOUT_S = 240
SERVER_STOP_TIMEOUT_S = 20


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


@dataclass
class TrackingServer:
    uri: str
    backend_uri: str
    artifacts: Path
    log: Path
    credentials: Credentials | None
    pid: int = 0  # the server's process group

    def client_env(self, *, with_credentials: bool = True) -> dict[str, str]:
        """Environment variables a dialogsum command needs to log to this server."""
        env = {"MLFLOW_TRACKING_URI": self.uri}
        if with_credentials and self.credentials:
            env.update(self.credentials.env())
        return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", PG_HOST, "-p", str(PG_PORT), "-t", "3"], capture_output=True).returncode == 0


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def _install_postgres() -> None:
    """Debian's package creates and starts cluster `main`; local TCP connections are then trusted, as on CI."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    for hba in Path("/etc/postgresql").glob("*/main/pg_hba.conf"):
        hba.write_text(f"host all {PG_USER} 127.0.0.1/32 trust\n" + hba.read_text())


def ensure_postgres(timeout_s: float = 60) -> None:
    """Make PostgreSQL answer on 127.0.0.1:5432, or raise saying why (tests must never skip for this)."""
    if postgres_ready():
        return
    if shutil.which("pg_ctlcluster") is None or not any(Path("/etc/postgresql").glob("*/main")):
        _install_postgres()
    for version in sorted(p.parent.name for p in Path("/etc/postgresql").glob("*/main")):
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"])
    deadline = time.monotonic() + timeout_s
    while not postgres_ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not answer on {PG_HOST}:{PG_PORT} within {timeout_s:.0f} s")
        time.sleep(0.5)


def _admin_connection():
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=10)
    connection.autocommit = True
    return connection


@contextmanager
def fresh_database(purpose: str) -> Iterator[str]:
    """A new database `dialogsum_<purpose>_<pid>_<random>`; yields its SQLAlchemy URI, drops it afterwards."""
    name = f"dialogsum_{purpose}_{os.getpid()}_{secrets.token_hex(4)}"
    connection = _admin_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()


def query(backend_uri: str, sql: str) -> list[tuple]:
    """Rows of `sql` run directly on a PostgreSQL backend store (to check what the server wrote)."""
    import psycopg2

    with psycopg2.connect(backend_uri.replace("postgresql+psycopg2://", "postgresql://"), connect_timeout=10) as connection:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()


def _write_auth_config(folder: Path, credentials: Credentials) -> Path:
    """basic-auth settings; the admin password itself goes through MLFLOW_AUTH_ADMIN_PASSWORD, not a file."""
    path = folder / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        f"admin_username = {credentials.username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # one PBKDF2 check per credential a minute, not one per request
    )
    return path


def _wait_healthy(uri: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the CLI, uvicorn and its workers); SIGKILL what outlives the grace time."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def mlflow_server(
    backend_uri: str,
    folder: Path,
    *,
    credentials: Credentials | None = None,
    workers: int = 1,
    start_timeout_s: float = SERVER_START_TIMEOUT_S,
    port: int | None = None,
) -> Iterator[TrackingServer]:
    """`mlflow server` on 127.0.0.1:<port> (default: a free one) storing runs in `backend_uri` and artifacts under
    `folder`; the yielded server's `pid` is its process group."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    artifacts = folder / "artifacts"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # GenAI scoring jobs: unused here, and slow to stop
    if credentials:
        command += ["--app-name", "basic-auth"]
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(_write_auth_config(folder, credentials)),
            MLFLOW_AUTH_ADMIN_PASSWORD=credentials.password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        )
    log = folder / "server.log"
    with log.open("a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env, start_new_session=True)
    server = TrackingServer(f"http://127.0.0.1:{port}", backend_uri, artifacts, log, credentials, process.pid)
    try:
        _wait_healthy(server.uri, process, log, start_timeout_s)
        yield server
    finally:
        _stop(process)


def new_admin_credentials() -> Credentials:
    return Credentials("admin", secrets.token_urlsafe(18))


@pytest.fixture(scope="session")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """The team setup for one test session: PostgreSQL backend store (a fresh database), proxied artifacts in a
    temp folder, basic-auth with a generated admin password."""
    ensure_postgres()
    with fresh_database("tracking") as backend_uri:
        with mlflow_server(backend_uri, tmp_path_factory.mktemp("team-server"), credentials=new_admin_credentials()) as server:
            yield server
