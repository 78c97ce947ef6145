"""A search engine for argilla-server 2.8 that answers from the server's own SQLite database.

Elasticsearch/OpenSearch cannot run on our machines, so the embedded server (annotation/server.py) registers
this engine as ``ARGILLA_SEARCH_ENGINE=sqlite``. It runs INSIDE .venv-argilla (it imports argilla_server);
annotation/argilla_launcher.py loads it by file path, so importing the ``annotation`` package never does.

How it fits argilla-server:
- The server writes records, responses, suggestions and statuses to its database and commits before it
  calls the search engine, so every write hook here (index_records, update_record_response, ...) is a no-op:
  there is no second copy of the data to keep in sync.
- Reads (search, progress, metadata metrics, similarity search) are SQL over the server's tables: one
  statement for a page of record ids (EXISTS / NOT EXISTS subqueries, ORDER BY, LIMIT/OFFSET) and one for
  the count. JSON columns are read with SQLite's json_extract / json_each.
- Without an explicit sort, a search made for a user (the annotator's queues: the server passes
  ``user_id``) is ordered by a per-user permutation of the records, as the Elasticsearch engine does with
  its seeded random score, so annotators sharing a dataset start on different records. Other searches
  follow insertion order.
- Text queries are SQL LIKE (case-insensitive for ASCII), every word (or "quoted phrase") must match;
  query scores are not computed (``None``).
"""

import dataclasses
import hashlib
import json
import math
import re
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from argilla_server.database import async_engine
from argilla_server.enums import MetadataPropertyType, ResponseStatusFilter, SimilarityOrder, SortOrder
from argilla_server.models import (
    Dataset,
    MetadataProperty,
    Record,
    Response,
    Suggestion,
    User,
    VectorSettings,
)
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)
from argilla_server.settings import settings
from sqlalchemy import text

SEARCH_ENGINE_NAME = "sqlite"

# Columns a record filter or sort may name (argilla_server.enums.RecordSortField), as SQL.
_RECORD_COLUMNS = {
    "id": "r.id",
    "external_id": "r.external_id",
    "inserted_at": "r.inserted_at",
    "updated_at": "r.updated_at",
    "status": "r.status",
}
_DATETIME_COLUMNS = {"inserted_at", "updated_at"}
# Per-user order: (rowid * a + b) mod a prime is a permutation of the records, seeded by the user id.
_PERMUTATION_PRIME = 2_147_483_647
_TERMS_METRICS_MAX_VALUES = 2**14  # what the Elasticsearch engine returns at most


# An index of ours next to argilla's: the annotator queues (a dataset's records by status, each probed for
# the user's response) and the default order are answered from it without reading the record rows.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS ix_rlhf_records_queue ON records (dataset_id, status, inserted_at, id)",
)


def create_indexes(connection: Any) -> None:
    """Create the indexes this engine relies on (idempotent); `connection` is a SQLAlchemy sync connection."""
    for statement in _INDEXES:
        connection.exec_driver_sql(statement)
    connection.commit()


def _uuid_sql(value: UUID | str) -> str:
    """SQLAlchemy stores UUID columns on SQLite as 32 hex characters without dashes."""
    return UUID(str(value)).hex


def _json_path(key: str) -> str:
    return '$."' + key.replace('"', '\\"') + '"'


def _datetime_sql(value: float | str) -> str:
    """A range bound for inserted_at/updated_at, written as SQLAlchemy stores datetimes on SQLite (UTC)."""
    if isinstance(value, (int, float)):  # epoch milliseconds, as Elasticsearch dates take them
        moment = datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    else:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _like_pattern(word: str) -> str:
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class _Sql:
    """Collects bound parameters while a statement is written."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def bind(self, value: Any) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    def bind_list(self, values: Iterable[Any]) -> str:
        return "(" + ", ".join(self.bind(value) for value in values) + ")"


def _range_sql(sql: _Sql, expression: str, ge: Any, le: Any) -> str:
    conditions = []
    if ge is not None:
        conditions.append(f"{expression} >= {sql.bind(ge)}")
    if le is not None:
        conditions.append(f"{expression} <= {sql.bind(le)}")
    return " AND ".join(conditions) or "1"


def _json_terms_sql(sql: _Sql, json_column: str, path: str, values: list[str]) -> str:
    """True when the JSON value at path (a scalar, or any element of a list) is one of values."""
    return (
        f"EXISTS (SELECT 1 FROM json_each({json_column}, {sql.bind(path)}) AS je "
        f"WHERE je.type != 'null' AND CAST(je.value AS TEXT) IN {sql.bind_list(values)})"
    )


def _filter_sql(sql: _Sql, filter: Filter) -> str:
    if isinstance(filter, AndFilter):
        parts = [_filter_sql(sql, f) for f in filter.filters]
        return "(" + " AND ".join(parts) + ")" if parts else "1"

    scope = filter.scope
    if isinstance(scope, RecordFilterScope):
        return _record_filter_sql(sql, filter, scope)
    if isinstance(scope, MetadataFilterScope):
        path = _json_path(scope.metadata_property)
        if isinstance(filter, TermsFilter):
            return _json_terms_sql(sql, "r.metadata", path, filter.values)
        return _range_sql(sql, f"json_extract(r.metadata, {sql.bind(path)})", filter.ge, filter.le)
    if isinstance(scope, SuggestionFilterScope):
        return _suggestion_filter_sql(sql, filter, scope)
    if isinstance(scope, ResponseFilterScope):
        return _response_filter_sql(sql, filter, scope)
    raise ValueError(f"Cannot process filter scope {scope}")


def _record_filter_sql(sql: _Sql, filter: Filter, scope: RecordFilterScope) -> str:
    column = _RECORD_COLUMNS.get(str(scope.property))
    if column is None:
        raise ValueError(f"Cannot filter records by {scope.property!r}")
    if isinstance(filter, TermsFilter):
        values = [_uuid_sql(v) for v in filter.values] if scope.property == "id" else filter.values
        return f"{column} IN {sql.bind_list(values)}"
    ge, le = filter.ge, filter.le
    if scope.property in _DATETIME_COLUMNS:
        ge = None if ge is None else _datetime_sql(ge)
        le = None if le is None else _datetime_sql(le)
    return _range_sql(sql, column, ge, le)


def _suggestion_filter_sql(sql: _Sql, filter: Filter, scope: SuggestionFilterScope) -> str:
    prop = scope.property or "value"
    if prop in ("value", "score"):
        column = f"s.{prop}"
        if isinstance(filter, TermsFilter):
            condition = _json_terms_sql(sql, column, "$", filter.values)
        else:  # a score may be a list (multi-label): any element in range
            condition = (
                f"EXISTS (SELECT 1 FROM json_each({column}) AS je WHERE "
                f"{_range_sql(sql, 'je.value', filter.ge, filter.le)})"
            )
    elif prop in ("agent", "type"):
        if not isinstance(filter, TermsFilter):
            raise ValueError(f"Suggestion {prop} takes a terms filter")
        condition = f"s.{prop} IN {sql.bind_list(filter.values)}"
    else:
        raise ValueError(f"Cannot filter suggestions by {prop!r}")
    return (
        "EXISTS (SELECT 1 FROM suggestions AS s JOIN questions AS q ON q.id = s.question_id "
        f"WHERE s.record_id = r.id AND q.name = {sql.bind(scope.question)} AND {condition})"
    )


def _response_filter_sql(sql: _Sql, filter: Filter, scope: ResponseFilterScope) -> str:
    def responses_where(condition: str | None) -> str:
        parts = ["rs.record_id = r.id"]
        if scope.user is not None:
            parts.append(f"rs.user_id = {sql.bind(_uuid_sql(scope.user.id))}")
        if condition:
            parts.append(condition)
        return "SELECT 1 FROM responses AS rs WHERE " + " AND ".join(parts)

    if scope.question:
        path = f"{_json_path(scope.question)}.value"
        if isinstance(filter, TermsFilter):
            condition = _json_terms_sql(sql, 'rs."values"', path, filter.values)
        else:
            condition = _range_sql(sql, f'json_extract(rs."values", {sql.bind(path)})', filter.ge, filter.le)
        return f"EXISTS ({responses_where(condition)})"

    if scope.property == "status" and isinstance(filter, TermsFilter):
        # "pending" means: no response (by this user when the filter is scoped to one).
        statuses = [v for v in filter.values if v != ResponseStatusFilter.pending]
        alternatives = []
        if len(statuses) < len(filter.values):
            alternatives.append(f"NOT EXISTS ({responses_where(None)})")
        if statuses:
            in_statuses = f"rs.status IN {sql.bind_list(str(s) for s in statuses)}"
            alternatives.append(f"EXISTS ({responses_where(in_statuses)})")
        return "(" + " OR ".join(alternatives) + ")"

    raise ValueError(f"Cannot process response filter on {scope}")


def _order_sql(sql: _Sql, order: Order) -> str:
    scope = order.scope
    if isinstance(scope, RecordFilterScope):
        expression = _RECORD_COLUMNS.get(str(scope.property))
        if expression is None:
            raise ValueError(f"Cannot sort records by {scope.property!r}")
    elif isinstance(scope, MetadataFilterScope):
        expression = f"json_extract(r.metadata, {sql.bind(_json_path(scope.metadata_property))})"
    elif isinstance(scope, SuggestionFilterScope):
        prop = scope.property or "value"
        if prop not in ("value", "score", "agent", "type"):
            raise ValueError(f"Cannot sort by suggestion {prop!r}")
        value = f"json_extract(s.{prop}, '$')" if prop in ("value", "score") else f"s.{prop}"
        expression = (
            f"(SELECT {value} FROM suggestions AS s JOIN questions AS q ON q.id = s.question_id "
            f"WHERE s.record_id = r.id AND q.name = {sql.bind(scope.question)})"
        )
    elif isinstance(scope, ResponseFilterScope):
        if scope.question:
            value = f'avg(json_extract(rs."values", {sql.bind(_json_path(scope.question) + ".value")}))'
        elif scope.property == "status":
            value = "min(rs.status)"
        else:
            raise ValueError(f"Cannot sort by response scope {scope}")
        user = f" AND rs.user_id = {sql.bind(_uuid_sql(scope.user.id))}" if scope.user is not None else ""
        expression = f"(SELECT {value} FROM responses AS rs WHERE rs.record_id = r.id{user})"
    else:
        raise ValueError(f"Cannot sort by scope {scope}")
    direction = "DESC" if order.order == SortOrder.desc else "ASC"
    return f"{expression} {direction} NULLS LAST"  # missing values last, as Elasticsearch sorts them


def _text_query_sql(sql: _Sql, query: TextQuery | str) -> str:
    if isinstance(query, str):
        query = TextQuery(q=query)
    words = [phrase or word for phrase, word in re.findall(r'"([^"]+)"|(\S+)', query.q)]
    conditions = []
    for word in words:
        pattern = sql.bind(_like_pattern(word))
        if query.field:
            path = sql.bind(_json_path(query.field))
            conditions.append(f"json_extract(r.fields, {path}) LIKE {pattern} ESCAPE '\\'")
        else:
            conditions.append(
                f"EXISTS (SELECT 1 FROM json_each(r.fields) AS je WHERE je.value LIKE {pattern} ESCAPE '\\')"
            )
    return " AND ".join(conditions) or "1"


def _user_permutation(user_id: UUID | str) -> tuple:
    digest = hashlib.sha256(str(user_id).encode()).digest()
    a = int.from_bytes(digest[:4], "big") % (_PERMUTATION_PRIME - 1) + 1
    b = int.from_bytes(digest[4:8], "big") % _PERMUTATION_PRIME
    return a, b


def _records_where(
    sql: _Sql,
    dataset: Dataset,
    query: TextQuery | str | None,
    filter: Filter | None,
) -> str:
    conditions = [f"r.dataset_id = {sql.bind(_uuid_sql(dataset.id))}"]
    if filter is not None:
        conditions.append(_filter_sql(sql, filter))
    if query is not None:
        conditions.append(_text_query_sql(sql, query))
    return " AND ".join(conditions)


@SearchEngine.register(engine_name=SEARCH_ENGINE_NAME)
@dataclasses.dataclass
class SQLiteSearchEngine(SearchEngine):
    """Answers argilla-server's searches from its own SQLite database (see the module docstring)."""

    @classmethod
    async def new_instance(cls) -> "SQLiteSearchEngine":
        if not settings.database_is_sqlite:
            raise ValueError(
                f"The {SEARCH_ENGINE_NAME!r} search engine reads the server's SQLite database; "
                "set ARGILLA_DATABASE_URL to a sqlite URL or use Elasticsearch/OpenSearch."
            )
        return cls()

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        await self._fetch("SELECT 1", {})
        return True

    async def info(self) -> dict:
        return {"engine": SEARCH_ENGINE_NAME, "database": "sqlite", "version": sqlite3.sqlite_version}

    # Write hooks: the server has already committed the change to the database we read from.

    async def create_index(self, dataset: Dataset) -> None:
        pass

    async def delete_index(self, dataset: Dataset) -> None:
        pass

    async def configure_metadata_property(
        self, dataset: Dataset, metadata_property: MetadataProperty
    ) -> None:
        pass

    async def configure_index_vectors(self, vector_settings: VectorSettings) -> None:
        pass

    async def index_records(self, dataset: Dataset, records: Iterable[Record]) -> None:
        pass

    async def partial_record_update(self, record: Record, **update: Any) -> None:
        pass

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]) -> None:
        pass

    async def update_record_response(self, response: Response) -> None:
        pass

    async def delete_record_response(self, response: Response) -> None:
        pass

    async def update_record_suggestion(self, suggestion: Suggestion) -> None:
        pass

    async def delete_record_suggestion(self, suggestion: Suggestion) -> None:
        pass

    # Reads.

    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        rows = await self._fetch(
            "SELECT r.status, count(*) FROM records AS r WHERE r.dataset_id = :dataset GROUP BY r.status",
            {"dataset": _uuid_sql(dataset.id)},
        )
        counts = {str(status): count for status, count in rows}
        return {"total": sum(counts.values()), **counts}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        rows = await self._fetch(
            "SELECT rs.status, count(*) FROM responses AS rs JOIN records AS r ON r.id = rs.record_id "
            "WHERE r.dataset_id = :dataset AND rs.user_id = :user GROUP BY rs.status",
            {"dataset": _uuid_sql(dataset.id), "user": _uuid_sql(user.id)},
        )
        counts = {str(status): count for status, count in rows}
        return {"total": sum(counts.values()), **counts}

    async def search(
        self,
        dataset: Dataset,
        query: TextQuery | str | None = None,
        filter: Filter | None = None,
        sort: list[Order] | None = None,
        offset: int = 0,
        limit: int = 100,
        user_id: UUID | str | None = None,
    ) -> SearchResponses:
        sql = _Sql()
        where = _records_where(sql, dataset, query, filter)

        if sort:
            order_by = [_order_sql(sql, order) for order in sort] + ["r.rowid"]
        elif user_id is not None:
            a, b = _user_permutation(user_id)
            order_by = [f"(r.rowid * {sql.bind(a)} + {sql.bind(b)}) % {_PERMUTATION_PRIME}"]
        else:
            order_by = ["r.inserted_at", "r.rowid"]

        page_sql = (
            f"SELECT r.id FROM records AS r WHERE {where} ORDER BY {', '.join(order_by)} "
            f"LIMIT {sql.bind(int(limit))} OFFSET {sql.bind(int(offset))}"
        )
        count_sql = f"SELECT count(*) FROM records AS r WHERE {where}"
        page, count = await self._fetch_many(sql.params, page_sql, count_sql)

        return SearchResponses(
            items=[SearchResponseItem(record_id=UUID(hex=record_id), score=None) for (record_id,) in page],
            total=count[0][0],
        )

    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        params = {
            "dataset": _uuid_sql(metadata_property.dataset_id),
            "path": _json_path(metadata_property.name),
        }

        if metadata_property.type == MetadataPropertyType.terms:
            rows = await self._fetch(
                "SELECT CAST(je.value AS TEXT) AS term, count(*) AS n "
                "FROM records AS r, json_each(r.metadata, :path) AS je "
                "WHERE r.dataset_id = :dataset AND je.type != 'null' "
                "GROUP BY term ORDER BY n DESC, term",
                params,
            )
            return TermsMetrics(
                total=sum(n for _, n in rows),
                values=[
                    TermsMetrics.TermCount(term=term, count=n) for term, n in rows[:_TERMS_METRICS_MAX_VALUES]
                ],
            )

        rows = await self._fetch(
            "SELECT min(json_extract(r.metadata, :path)), max(json_extract(r.metadata, :path)) "
            "FROM records AS r WHERE r.dataset_id = :dataset",
            params,
        )
        low, high = rows[0]
        if metadata_property.type == MetadataPropertyType.integer:
            to_int = lambda v: None if v is None else int(v)  # noqa: E731
            return IntegerMetadataMetrics(min=to_int(low), max=to_int(high))
        return FloatMetadataMetrics(min=low, max=high)

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: list[float] | None = None,
        record: Record | None = None,
        query: TextQuery | str | None = None,
        filter: Filter | None = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: float | None = None,
    ) -> SearchResponses:
        """Exact cosine similarity over the dataset's vectors (brute force; fine for local datasets)."""
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")
        if value:
            target = value
        else:
            assert record is not None  # the check above: exactly one of value and record is given
            target = record.vector_value_by_vector_settings(vector_settings)
        if not target:
            raise ValueError("Cannot find a vector value to apply with provided info")

        sql = _Sql()
        where = _records_where(sql, dataset, query, filter)
        rows = await self._fetch(
            "SELECT r.id, v.value FROM records AS r JOIN vectors AS v ON v.record_id = r.id "
            f"WHERE v.vector_settings_id = {sql.bind(_uuid_sql(vector_settings.id))} AND {where}",
            sql.params,
        )
        sign = -1.0 if order == SimilarityOrder.least_similar else 1.0
        excluded = record.id.hex if record is not None else None
        scored = []
        for record_id, vector_json in rows:
            if record_id == excluded:
                continue
            score = sign * _cosine(target, _parse_vector(vector_json))
            if threshold is None or score >= threshold:
                scored.append((score, record_id))
        scored.sort(key=lambda item: item[0], reverse=True)
        items = [
            SearchResponseItem(record_id=UUID(hex=rid), score=score) for score, rid in scored[:max_results]
        ]
        return SearchResponses(items=items, total=len(items))

    @classmethod
    async def _fetch(cls, statement: str, params: dict[str, Any]) -> list[tuple]:
        [rows] = await cls._fetch_many(params, statement)
        return rows

    @staticmethod
    async def _fetch_many(params: dict[str, Any], *statements: str) -> list[list[tuple]]:
        """Run the statements on one connection; the rows of each."""
        async with async_engine.connect() as connection:
            results = []
            for (
                statement
            ) in statements:  # each statement gets the parameters it names (sqlite3 ignores others)
                result = await connection.execute(text(statement), params)
                results.append([tuple(row) for row in result.all()])
            return results


def _parse_vector(value: Any) -> list[float]:
    return json.loads(value) if isinstance(value, str) else value


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
