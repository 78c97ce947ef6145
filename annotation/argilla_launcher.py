"""Start argilla-server 2.8 (REST API + web UI) or its background worker. Runs with .venv-argilla/bin/python.

annotation/server.py starts this script as a background process and sets the server's configuration in the
environment (ARGILLA_DATABASE_URL, ARGILLA_REDIS_URL, ARGILLA_SEARCH_ENGINE, ...). argilla-server's own
CLI (typer 0.9) breaks with click >= 8.2, hence this small launcher:

    python annotation/argilla_launcher.py server --host 127.0.0.1 --port 6900 --credentials HOME/credentials.json
    python annotation/argilla_launcher.py worker

`server` migrates the database, makes sure the workspace and the owner account from the credentials file
exist (annotators are created by server.py through the REST API), then runs uvicorn. Nothing secret is
printed: stdout and stderr go to log files.
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A script's folder comes first on sys.path: drop it so that the other annotation modules (written for the
# project's environment) cannot shadow packages of this one.
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    del sys.path[0]


def load_search_engine() -> types.ModuleType:
    """Import annotation/sql_search.py by path: registers the SQLite search engine (and imports argilla_server)."""
    spec = importlib.util.spec_from_file_location("rlhf_sql_search", HERE / "sql_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def migrate_database(search_engine: types.ModuleType) -> None:
    from alembic import command
    from alembic.config import Config
    from argilla_server.database import ALEMBIC_CONFIG_FILE, sync_engine

    # A Config without a file name: argilla's alembic env.py then leaves the logging configuration alone.
    config = Config()
    config.set_main_option("script_location", str(Path(ALEMBIC_CONFIG_FILE).parent / "alembic"))
    command.upgrade(config, "head")
    with sync_engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")  # readers do not wait for writers (kept in the file)
        search_engine.create_indexes(connection)
    print("database migrated to head", flush=True)


def ensure_owner(credentials_path: Path) -> None:
    """Create (or repair) the workspace and the owner account described in the credentials file."""
    from argilla_server.contexts.accounts import hash_password, verify_password
    from argilla_server.database import SyncSessionLocal
    from argilla_server.enums import UserRole
    from argilla_server.models import User, Workspace, WorkspaceUser
    from sqlalchemy import select

    credentials = json.loads(credentials_path.read_text())
    owner = next(user for user in credentials["users"] if user["role"] == "owner")

    with SyncSessionLocal() as db:
        workspace = db.scalar(select(Workspace).filter_by(name=credentials["workspace"]))
        if workspace is None:
            workspace = Workspace(name=credentials["workspace"])
            db.add(workspace)

        user = db.scalar(select(User).filter_by(username=owner["username"]))
        if user is None:
            user = User(
                first_name=owner["username"],
                username=owner["username"],
                role=UserRole.owner,
                api_key=owner["api_key"],
                password_hash=hash_password(owner["password"]),
            )
            db.add(user)
        else:
            user.role = UserRole.owner
            user.api_key = owner["api_key"]
            if not verify_password(owner["password"], user.password_hash):
                user.password_hash = hash_password(owner["password"])
        db.flush()

        if db.scalar(select(WorkspaceUser).filter_by(workspace_id=workspace.id, user_id=user.id)) is None:
            db.add(WorkspaceUser(workspace_id=workspace.id, user_id=user.id))
        db.commit()
    print(f"workspace {credentials['workspace']!r} and owner {owner['username']!r} ready", flush=True)


def run_server(host: str, port: int, credentials_path: Path) -> None:
    # The key that signs UI sessions (so they survive restarts) is read here, not passed in the environment.
    auth_secret_key = json.loads(credentials_path.read_text())["auth_secret_key"]
    os.environ["ARGILLA_AUTH_SECRET_KEY"] = auth_secret_key
    search_engine = load_search_engine()
    migrate_database(search_engine)
    ensure_owner(credentials_path)

    import uvicorn
    from argilla_server._app import app

    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")


def run_worker() -> None:
    # Importing argilla_server copies its 14 MB web UI into a new temporary folder; the worker does not
    # serve it, so that copy goes into a folder removed right after the import.
    import_tmp = tempfile.mkdtemp(prefix="worker-import-")
    tempfile.tempdir = import_tmp
    try:
        load_search_engine()
        from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION
    finally:
        tempfile.tempdir = None
        shutil.rmtree(import_tmp, ignore_errors=True)

    from rq import Worker

    print("worker listening on queues high, default", flush=True)
    Worker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION).work(logging_level="WARNING")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server", help="migrate the database, ensure the owner, serve API and UI")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=6900)
    server.add_argument("--credentials", type=Path, required=True)
    commands.add_parser("worker", help="run the rq worker for argilla-server's background jobs")
    args = parser.parse_args()

    if args.command == "server":
        run_server(args.host, args.port, args.credentials)
    else:
        run_worker()


if __name__ == "__main__":
    main()
