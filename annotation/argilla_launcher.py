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
import gc
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


def install_speedups() -> None:
    """Remove argilla-server's per-record overheads; the API's behaviour is unchanged.

    Measured on the bulk upsert of 1,000 records (PUT /api/v1/datasets/{id}/records/bulk), which ran at
    ~60 records/s:
    - every record's metadata value was checked through a pydantic TypeAdapter built anew for each value
      (`MetadataProperty.parsed_settings`; ~2 ms each), every response's values likewise
      (`Question.parsed_settings`, ~5 ms): one adapter of each is built once and reused;
    - every created/updated record (and every response) built a webhook event first, reloading its
      dataset with 5 relationships (6 queries), then looked for enabled webhooks and, finding none, threw
      the event away: the event is now built only when the session's database has an enabled webhook
      (looked up once per session, i.e. per request);
    - SQLite (already in WAL mode) synced the disk on every commit: `synchronous=NORMAL` syncs at WAL
      checkpoints instead. A killed or stopped server loses nothing committed; only a power cut or an OS
      crash may drop the last commits.
    """
    from argilla_server import database
    from argilla_server.api.schemas.v1.questions import QuestionSettings
    from argilla_server.bulk import records_bulk
    from argilla_server.contexts import datasets, distribution, records, webhooks
    from argilla_server.models import MetadataProperty, Question
    from argilla_server.models.metadata_properties import MetadataPropertySettings
    from argilla_server.settings import settings
    from pydantic import TypeAdapter
    from sqlalchemy import event

    if settings.database_is_sqlite:

        @event.listens_for(database.async_engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

    metadata_settings = TypeAdapter(MetadataPropertySettings)
    MetadataProperty.parsed_settings = property(lambda self: metadata_settings.validate_python(self.settings))
    question_settings = TypeAdapter(QuestionSettings)
    Question.parsed_settings = property(lambda self: question_settings.validate_python(self.settings))

    async def webhooks_enabled(db) -> bool:
        if "rlhf_webhooks_enabled" not in db.info:
            db.info["rlhf_webhooks_enabled"] = bool(await webhooks.list_enabled_webhooks(db))
        return db.info["rlhf_webhooks_enabled"]

    def only_with_webhooks(notify):
        async def notify_when_enabled(db, event_name, resource):
            if not await webhooks_enabled(db):
                return []
            return await notify(db, event_name, resource)

        return notify_when_enabled

    for module in (records_bulk, datasets, distribution, records):
        for name in ("notify_record_event_v1", "notify_response_event_v1", "notify_dataset_event_v1"):
            if hasattr(module, name):
                setattr(module, name, only_with_webhooks(getattr(module, name)))


def tune_garbage_collector() -> None:
    """Keep Python's cyclic garbage collector off the server's large, long-lived start-up heap.

    With the default thresholds a full collection rescans every object of the imported app whenever a
    response allocates many objects: listing 1,000 records with 3,000 responses took 1.3 s, 0.4 s with the
    start-up objects frozen (never scanned again) and collections triggered less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def migrate_database(search_engine: types.ModuleType) -> None:
    from alembic import command
    from alembic.config import Config
    from argilla_server.database import ALEMBIC_CONFIG_FILE, sync_engine

    # A Config without a file name: argilla's alembic env.py then leaves the logging configuration alone.
    config = Config()
    config.set_main_option("script_location", str(Path(ALEMBIC_CONFIG_FILE).parent / "alembic"))
    command.upgrade(config, "head")
    with sync_engine.connect() as connection:
        connection.exec_driver_sql(
            "PRAGMA journal_mode=WAL"
        )  # readers do not wait for writers (kept in the file)
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
    install_speedups()

    import uvicorn
    from argilla_server._app import app

    tune_garbage_collector()
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
