"""Start argilla-server 2.8 (REST API + web UI) or its background worker. Runs with .venv-argilla/bin/python.

annotation/server.py starts this script as a background process and sets the server's configuration in the
environment (ARGILLA_DATABASE_URL, ARGILLA_REDIS_URL, ARGILLA_SEARCH_ENGINE, ...). argilla-server's own
CLI (typer 0.9) breaks with click >= 8.2, hence this small launcher:

    python annotation/argilla_launcher.py server --host 127.0.0.1 --port 6900 --credentials HOME/credentials.json
    python annotation/argilla_launcher.py worker --credentials HOME/credentials.json

`server` migrates the database, makes sure the workspace and the owner account from the credentials file
exist (annotators are created by server.py through the REST API), restricts what annotators can read of
each other's work (`hide_other_users_responses`), then runs uvicorn. Both read Valkey's password from the
credentials file. Nothing secret is printed: stdout and stderr go to log files.
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
from unittest import mock

HERE = Path(__file__).resolve().parent
# A script's folder comes first on sys.path: drop it so that the other annotation modules (written for the
# project's environment) cannot shadow packages of this one.
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    del sys.path[0]


def load_search_engine() -> types.ModuleType:
    """Import annotation/sql_search.py by path: registers the SQLite search engine (and imports argilla_server)."""
    spec = importlib.util.spec_from_file_location("rlhf_sql_search", HERE / "sql_search.py")
    assert spec is not None and spec.loader is not None  # a .py file path always has a source loader
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


def use_valkey_password(credentials: dict) -> None:
    """Give argilla's Redis connection (the server's queues, the worker's) Valkey's password.

    ARGILLA_REDIS_URL carries none: argilla prints that URL when Valkey does not answer, and an environment
    is more widely copied than a file. The connection pool connects lazily, so setting the password before
    the first command is enough; rq's worker copies these connection settings for its own connections.
    """
    from argilla_server.jobs.queues import REDIS_CONNECTION

    REDIS_CONNECTION.connection_pool.connection_kwargs["password"] = credentials["valkey_password"]


def hide_other_users_responses() -> None:
    """GET /api/v1/records/{id} shows an annotator their own response only, and no hidden metadata.

    argilla-server 2.8 returns every user's responses there to any member of the workspace, so an annotator
    could read the others' rankings of a record before ranking it, and metadata not `visible_for_annotators`.
    The annotator's own search (/api/v1/me/datasets/{id}/records/search, what the web UI uses) already limits
    both; this route now does the same. Who sees everything is argilla's own rule for listing a dataset's
    records with all responses: the owner, and admins of the workspace.
    """
    from typing import Annotated
    from uuid import UUID

    from argilla_server.api.handlers.v1.datasets.records import _filter_record_metadata_for_user
    from argilla_server.api.policies.v1 import DatasetPolicy, RecordPolicy, authorize, is_authorized
    from argilla_server.api.routes import api_v1
    from argilla_server.database import get_async_db
    from argilla_server.models import Dataset, Record, User
    from argilla_server.security import auth
    from fastapi import Depends, Security
    from fastapi.routing import APIRoute
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import selectinload
    from sqlalchemy.orm.attributes import set_committed_value

    routes = api_v1.router.routes
    path = "/records/{record_id}"
    found = [
        i for i, r in enumerate(routes) if isinstance(r, APIRoute) and r.path == path and "GET" in r.methods
    ]
    if len(found) != 1:  # another argilla-server version: refuse to serve rather than leak
        raise RuntimeError(f"argilla-server has {len(found)} GET {path} routes; expected 1 to restrict")
    original = routes[found[0]]

    async def get_record(
        db: Annotated[AsyncSession, Depends(get_async_db)],
        record_id: UUID,
        current_user: Annotated[User, Security(auth.get_current_user)],
    ):
        record = await Record.get_or_raise(
            db,
            record_id,
            options=[
                selectinload(Record.dataset).selectinload(Dataset.metadata_properties),
                selectinload(Record.suggestions),
                selectinload(Record.responses),
                selectinload(Record.vectors),
            ],
        )
        await authorize(current_user, RecordPolicy.get(record))
        if not await is_authorized(
            current_user, DatasetPolicy.list_records_with_all_responses(record.dataset)
        ):
            # set_committed_value: what this answer shows changes, nothing is written back to the database
            own = [response for response in record.responses if response.user_id == current_user.id]
            set_committed_value(record, "responses", own)
            set_committed_value(
                record, "metadata_", await _filter_record_metadata_for_user(record, current_user)
            )
        return record

    api_v1.add_api_route(
        path,
        get_record,
        methods=["GET"],
        response_model=original.response_model,
        tags=original.tags,
        name=original.name,
    )
    routes[found[0]] = routes.pop()  # in the original's place: routes match in order


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
    credentials = json.loads(credentials_path.read_text())
    os.environ["ARGILLA_AUTH_SECRET_KEY"] = credentials["auth_secret_key"]
    search_engine = load_search_engine()
    use_valkey_password(credentials)
    migrate_database(search_engine)
    ensure_owner(credentials_path)
    install_speedups()
    hide_other_users_responses()

    import uvicorn
    from argilla_server._app import app

    tune_garbage_collector()
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")


def run_worker(credentials_path: Path) -> None:
    # Importing argilla_server copies its 14 MB web UI into a new temporary folder (with the package's file
    # modes). The worker does not serve it: during the import that copy is an empty folder, in a folder
    # removed right after.
    def empty_copy(source: str, target: str, *args, **kwargs) -> str:
        os.makedirs(target)
        return target

    import_tmp = tempfile.mkdtemp(prefix="worker-import-")
    tempfile.tempdir = import_tmp
    try:
        with mock.patch.object(shutil, "copytree", empty_copy):
            load_search_engine()
            from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION
    finally:
        tempfile.tempdir = None
        shutil.rmtree(import_tmp, ignore_errors=True)
    use_valkey_password(json.loads(credentials_path.read_text()))

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
    worker = commands.add_parser("worker", help="run the rq worker for argilla-server's background jobs")
    worker.add_argument("--credentials", type=Path, required=True)
    args = parser.parse_args()

    if args.command == "server":
        run_server(args.host, args.port, args.credentials)
    else:
        run_worker(args.credentials)


if __name__ == "__main__":
    main()
