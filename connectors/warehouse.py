"""The ClickHouse side of Loopcast: one Warehouse interface over three engines.

- EmbeddedWarehouse: chDB (embedded ClickHouse) on a data directory. A data directory can be held
  by one process at a time, and one process can hold only one directory (see STACK-NOTES), so the
  worker owns it and serves read-only SQL over HTTP (`sql_routes`) to everybody else.
- ServerWarehouse: a ClickHouse server through clickhouse-connect (settings.clickhouse_url).
- RemoteWarehouse: a read-only client of the owner's `POST /sql` endpoint.

`connect(settings, owner=...)` picks one. All engines share the same SQL dialect and the same
parameter syntax: ClickHouse query parameters `{name:Type}`, bound by the engine, never pasted.
`query()` runs only read-only statements (see `ensure_read_only`, and every query also carries
`SETTINGS readonly=1`); `command()` and `insert()` are for the owner's writes.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import datetime as dt
import decimal
import enum
import fcntl
import ipaddress
import json
import logging
import math
import operator
import os
import re
import threading
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from aiohttp import web

from infra.clickhouse import Migration
from infra.clickhouse import migrations as bundled_migrations
from schemas.models import Alert, DeadLetter, Event, Outcome, TagChange

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "EmbeddedWarehouse",
    "ReadOnlyWarehouse",
    "RemoteWarehouse",
    "ServerWarehouse",
    "Warehouse",
    "WarehouseError",
    "WarehouseLocked",
    "WarehousePathConflict",
    "WarehouseQueryError",
    "connect",
    "encode_parameters",
    "ensure_read_only",
    "funnel",
    "insert_dead_letters",
    "insert_outcomes",
    "migrate",
    "split_statements",
    "sql_routes",
]

OWNER_FILE = "warehouse.json"
# Appended to every query(): the engine itself refuses writes, DDL, table functions (file, url,
# Python, ...) and setting changes, whatever the text guard let through.
READ_ONLY_SUFFIX = "\nSETTINGS readonly=1"


# --------------------------------------------------------------------------------------------
# Errors


class WarehouseError(RuntimeError):
    """A warehouse call failed."""


class WarehouseQueryError(WarehouseError):
    """The engine refused or failed a statement (syntax, unknown table, type mismatch...)."""


class ReadOnlyWarehouse(WarehouseError):
    """A write or a statement that is not read-only was sent where only reads are allowed."""


class WarehouseLocked(WarehouseError):
    """Another process holds the chDB data directory."""

    def __init__(self, path: Path, pid: int | None, hint: str = "") -> None:
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        message = (
            f"chDB data directory {path} is held by {holder}: chDB lets one process open a data "
            f"directory at a time. Read through the owner's SQL endpoint (connect(settings)) or stop "
            f"the owner first."
        )
        super().__init__(f"{message} {hint}".strip())


class WarehousePathConflict(WarehouseError):
    """This process already has a different chDB data directory open."""


# --------------------------------------------------------------------------------------------
# SQL text: a small ClickHouse lexer, enough to find statement boundaries and leading keywords.
#
# It mirrors ClickHouse's lexer for everything that can hide a `;`: quoted strings and names
# ('...', "...", `...` with backslash and doubled-quote escapes), comments (--, //, "# ", "#!",
# nested /* */) and heredocs ($tag$...$tag$). Where it cannot be sure to agree with the engine it
# fails closed: curly quotes are refused, and `$` starts a heredoc only after a non-word character.


class _LexError(ValueError):
    pass


class _Token(NamedTuple):
    kind: str  # "word", "quoted", ";", "(", "other"
    start: int
    end: int


_HEREDOC = re.compile(r"\$[A-Za-z0-9_]*\$")
_READ_ONLY_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS"})
# Client-side features of clickhouse-local (and so of chDB) that `readonly` does not cover.
_FORBIDDEN_WORDS = {"OUTFILE": "INTO OUTFILE writes a file"}


def _is_ascii_word_start(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _is_ascii_word_char(ch: str) -> bool:
    return _is_ascii_word_start(ch) or "0" <= ch <= "9"


def _skip_quoted(sql: str, i: int) -> int:
    quote, n, j = sql[i], len(sql), i + 1
    while j < n:
        ch = sql[j]
        if ch == "\\":
            j += 2
        elif ch == quote:
            if j + 1 < n and sql[j + 1] == quote:
                j += 2
            else:
                return j + 1
        else:
            j += 1
    raise _LexError(f"unterminated {quote} quote")


def _skip_block_comment(sql: str, i: int) -> int:
    depth, n, j = 0, len(sql), i
    while j < n:
        if sql.startswith("/*", j):
            depth += 1
            j += 2
        elif sql.startswith("*/", j):
            depth -= 1
            j += 2
            if depth == 0:
                return j
        else:
            j += 1
    raise _LexError("unterminated /* comment")


def _tokens(sql: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith(("--", "//"), i) or (ch == "#" and sql.startswith(("# ", "#!"), i)):
            newline = sql.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
        elif ch in "'\"`":
            j = _skip_quoted(sql, i)
            out.append(_Token("quoted", i, j))
            i = j
        elif ch in "\u2018\u2019\u201c\u201d":
            raise _LexError("curly quotes are not accepted: use ' for strings and \" or ` for names")
        elif ch == "$" and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_$" or ord(sql[i - 1]) > 127)):
            opener = _HEREDOC.match(sql, i)
            close = sql.find(opener.group(), opener.end()) if opener else -1
            if opener and close >= 0:
                j = close + len(opener.group())
                out.append(_Token("quoted", i, j))
                i = j
            else:
                out.append(_Token("other", i, i + 1))
                i += 1
        elif ch in ";(":
            out.append(_Token(ch, i, i + 1))
            i += 1
        elif _is_ascii_word_start(ch):
            j = i + 1
            while j < n and (_is_ascii_word_char(sql[j]) or sql[j] == "$"):
                j += 1
            out.append(_Token("word", i, j))
            i = j
        elif "0" <= ch <= "9":
            j = i + 1
            while j < n and _is_ascii_word_char(sql[j]):
                j += 1
            out.append(_Token("other", i, j))
            i = j
        else:
            out.append(_Token("other", i, i + 1))
            i += 1
    return out


def split_statements(sql: str) -> list[str]:
    """Split a script on `;` outside strings and comments; statements holding only comments are dropped."""
    try:
        tokens = _tokens(sql)
    except _LexError as exc:
        raise WarehouseError(f"cannot split SQL script: {exc}") from None
    statements: list[str] = []
    start, has_tokens = 0, False
    for token in tokens:
        if token.kind == ";":
            if has_tokens:
                statements.append(sql[start : token.start].strip())
            start, has_tokens = token.end, False
        else:
            has_tokens = True
    if has_tokens:
        statements.append(sql[start:].strip())
    return statements


def ensure_read_only(sql: str) -> str:
    """Refuse anything but exactly one read-only statement; return it without its trailing `;`.

    Accepted: one statement (a trailing `;` is fine) whose first keyword, after comments, whitespace
    and opening parentheses, is SELECT, WITH, SHOW, DESCRIBE, DESC, EXPLAIN or EXISTS.
    Raises ReadOnlyWarehouse otherwise. The engines add `readonly=1` as a second line of defence.
    """
    if not isinstance(sql, str):
        raise ReadOnlyWarehouse("refused: the SQL must be a string")
    try:
        tokens = _tokens(sql)
    except _LexError as exc:
        raise ReadOnlyWarehouse(f"refused: {exc}") from None
    end = next((i for i, t in enumerate(tokens) if t.kind == ";"), len(tokens))
    body, rest = tokens[:end], tokens[end:]
    if any(t.kind != ";" for t in rest):
        raise ReadOnlyWarehouse("refused: send exactly one statement (found another statement after ';')")
    lead = next((t for t in body if t.kind != "("), None)
    if lead is None:
        raise ReadOnlyWarehouse("refused: no SQL statement")
    keyword = sql[lead.start : lead.end].upper()
    if lead.kind != "word" or keyword not in _READ_ONLY_KEYWORDS:
        allowed = ", ".join(sorted(_READ_ONLY_KEYWORDS))
        shown = sql[lead.start : lead.end][:40]
        raise ReadOnlyWarehouse(f"refused: only read-only statements ({allowed}) are allowed, not {shown!r}")
    for token in body:
        reason = _FORBIDDEN_WORDS.get(sql[token.start : token.end].upper()) if token.kind == "word" else None
        if reason:
            raise ReadOnlyWarehouse(f"refused: {reason}")
    statement_end = rest[0].start if rest else len(sql)
    return sql[:statement_end].rstrip()


# --------------------------------------------------------------------------------------------
# Parameters: ClickHouse `{name:Type}` placeholders. Values travel as text in ClickHouse's
# "escaped" format (as the HTTP interface's param_<name>), and the engine parses them as <Type>.

_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_]*\s*:[^}]+\}")
_ESCAPES = {"\\": "\\\\", "'": "\\'", "`": "\\`", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"}


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _datetime_text(value: dt.datetime) -> str:
    """Naive datetimes are taken as UTC (as in schemas.models); microseconds only when non-zero,
    so the value also parses as a plain DateTime."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f" if value.microsecond else "%Y-%m-%d %H:%M:%S")


def _param_text(value: Any, top: bool) -> str:
    def quoted(text: str) -> str:
        return text if top else f"'{_escape(text)}'"

    if value is None:
        return "\\N" if top else "NULL"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _escape(value) if top else f"'{_escape(value)}'"
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = "".join(f"\\x{b:02x}" for b in bytes(value))
        return text if top else f"'{text}'"
    if isinstance(value, dt.datetime):
        return quoted(_datetime_text(value))
    if isinstance(value, dt.date):
        return quoted(value.isoformat())
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, decimal.Decimal)):
        return str(value)
    if isinstance(value, (uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return quoted(str(value))
    if isinstance(value, (list, set, frozenset)):
        return "[" + ", ".join(_param_text(v, False) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_param_text(v, False) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_param_text(k, False)}: {_param_text(v, False)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot bind a {type(value).__name__} as a query parameter")


def encode_parameters(parameters: Mapping[str, Any] | None) -> dict[str, str]:
    """Python values → the text ClickHouse parses for `{name:Type}` placeholders.

    None is NULL (use a Nullable type), datetimes are sent in UTC, lists are arrays, tuples are
    tuples, dicts are maps. Raises WarehouseQueryError for bad names or values.
    """
    if not parameters:
        return {}
    if not isinstance(parameters, Mapping):
        raise WarehouseQueryError("parameters must be an object mapping names to values")
    encoded: dict[str, str] = {}
    for name, value in parameters.items():
        if not isinstance(name, str) or not _PARAM_NAME.match(name):
            raise WarehouseQueryError(f"bad parameter name {name!r}: use letters, digits and _")
        try:
            encoded[name] = _param_text(value, True)
        except TypeError as exc:
            raise WarehouseQueryError(f"parameter {name!r}: {exc}") from None
    return encoded


def _jsonable_parameters(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """For RemoteWarehouse: turn values JSON cannot carry into the text ClickHouse parses."""

    def convert(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            value = value.value
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dt.datetime):
            return _datetime_text(value)
        if isinstance(value, dt.date):
            return value.isoformat()
        if isinstance(value, (decimal.Decimal, uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return str(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise WarehouseQueryError("binary parameters cannot go through the SQL endpoint") from None
        if isinstance(value, (list, tuple, set, frozenset)):
            return [convert(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        raise WarehouseQueryError(f"cannot bind a {type(value).__name__} as a query parameter")

    return {name: convert(value) for name, value in (parameters or {}).items()}


# --------------------------------------------------------------------------------------------
# Results: Parquet → Arrow → rows, rows → JSON (the endpoint).
# Both engines answer in Parquet rather than Arrow: ClickHouse's Arrow output turns DateTime into
# plain uint32 numbers, its Parquet output keeps them timestamps (and DateTime64 at its precision).


def _rows_from_parquet(data: bytes) -> list[dict[str, Any]]:
    # use_threads=False: the results are small, and Arrow's CPU thread pool alive at interpreter
    # exit next to an unclosed chDB can abort the process (observed with chdb-core 26.9).
    return _rows_from_arrow(pq.read_table(pa.BufferReader(data), use_threads=False))


def _rows_from_arrow(table: pa.Table) -> list[dict[str, Any]]:
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    # A String column may hold bytes that are not UTF-8 (dead_letters.original): those values come
    # back as bytes, the valid ones as str.
    names = table.column_names
    columns: list[list[Any]] = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            binary = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
            columns.append([_decode(v) for v in binary.to_pylist()])
        else:
            columns.append(column.to_pylist())
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _decode(value: bytes | None) -> str | bytes | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def json_safe(value: Any) -> Any:
    """A query result value → JSON: datetimes ISO 8601, bytes as UTF-8 text when they are valid
    UTF-8 and base64 otherwise, decimals and UUIDs as strings, NaN/inf as null."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii")
    return str(value)


# --------------------------------------------------------------------------------------------
# Inserts: rows → an Arrow table typed after the ClickHouse columns

_INT_TYPES = {
    "Int8": pa.int8(), "Int16": pa.int16(), "Int32": pa.int32(), "Int64": pa.int64(),
    "UInt8": pa.uint8(), "UInt16": pa.uint16(), "UInt32": pa.uint32(), "UInt64": pa.uint64(),
    "Float32": pa.float32(), "Float64": pa.float64(), "Bool": pa.bool_(),
    "Date": pa.date32(), "Date32": pa.date32(),
}  # fmt: skip
_TABLE_NAME = re.compile(r"(?:([A-Za-z_][A-Za-z0-9_]*)\.)?([A-Za-z_][A-Za-z0-9_]*)\Z")


def _unwrap(ch_type: str, wrapper: str) -> str | None:
    prefix = wrapper + "("
    return ch_type[len(prefix) : -1].strip() if ch_type.startswith(prefix) and ch_type.endswith(")") else None


def _column_arrow_type(ch_type: str) -> tuple[pa.DataType | None, bool]:
    """(Arrow type or None to let pyarrow infer, nullable) for a ClickHouse column type."""
    ch_type = ch_type.strip()
    ch_type = _unwrap(ch_type, "LowCardinality") or ch_type
    inner = _unwrap(ch_type, "Nullable")
    nullable = inner is not None
    ch_type = _unwrap(inner or ch_type, "LowCardinality") or inner or ch_type
    if ch_type == "String" or ch_type.startswith(("FixedString(", "Enum8(", "Enum16(")):
        # binary takes both str and bytes; ClickHouse Strings are byte strings
        return pa.binary(), nullable
    if ch_type in _INT_TYPES:
        return _INT_TYPES[ch_type], nullable
    if ch_type.startswith("DateTime64("):
        precision = int(ch_type[len("DateTime64(") :].split(",")[0].split(")")[0])
        unit = "s" if precision == 0 else "ms" if precision <= 3 else "us" if precision <= 6 else "ns"
        return pa.timestamp(unit, tz="UTC"), nullable
    if ch_type == "DateTime" or ch_type.startswith("DateTime("):
        return pa.timestamp("s", tz="UTC"), nullable
    return None, nullable


def _parse_table_name(table: str) -> tuple[str | None, str]:
    match = _TABLE_NAME.match(table or "")
    if not match:
        raise WarehouseQueryError(f"bad table name {table!r}: use name or database.name (letters, digits, _)")
    return match.group(1), match.group(2)


def _arrow_table(table: str, columns: Mapping[str, Sequence[Any]], column_types: dict[str, str]) -> pa.Table:
    unknown = [name for name in columns if name not in column_types]
    if unknown:
        raise WarehouseQueryError(f"table {table} has no column(s) {', '.join(map(repr, unknown))}")
    fields: list[pa.Field] = []
    arrays: list[pa.Array] = []
    for name in (c for c in column_types if c in columns):
        arrow_type, nullable = _column_arrow_type(column_types[name])
        try:
            array = pa.array(columns[name], type=arrow_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            raise WarehouseQueryError(f"{table}.{name} ({column_types[name]}): {exc}") from None
        if not nullable and array.null_count:
            raise WarehouseQueryError(
                f"{table}.{name} ({column_types[name]}) is not Nullable but {array.null_count} row(s) have no value"
            )
        fields.append(pa.field(name, array.type, nullable=nullable))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


_COLUMNS_SQL = (
    "SELECT name, type FROM system.columns "
    "WHERE database = coalesce({db:Nullable(String)}, currentDatabase()) "
    "AND table = {table:String} ORDER BY position"
)


# --------------------------------------------------------------------------------------------
# The interface


class Warehouse(ABC):
    """What Loopcast needs from ClickHouse, whichever engine runs it."""

    engine: str = "?"

    @abstractmethod
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run one read-only statement (see ensure_read_only) with `{name:Type}` parameters bound by
        the engine; rows as dicts. Raises ReadOnlyWarehouse or WarehouseQueryError."""

    @abstractmethod
    def command(self, sql: str) -> None:
        """Run one statement that returns no rows (DDL, OPTIMIZE, ...)."""

    def insert(self, table: str, rows: list[dict[str, Any]]) -> int:
        """Insert rows, dicts keyed by column, in one batch; the number of rows written.

        The columns are those of the first row (the others take their DEFAULT); values are typed
        after the table's columns, and None in a column that is not Nullable is refused."""
        if not rows:
            return 0
        return self.insert_columns(table, {name: [row.get(name) for row in rows] for name in rows[0]})

    @abstractmethod
    def insert_columns(self, table: str, columns: Mapping[str, Sequence[Any]]) -> int:
        """Insert one batch given column by column (lists of one length), as insert does rows: for
        writers that hold their values by column already (a dict per row cost the outcome writer
        more than the insert's own Python)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _table_columns(self, table: str) -> dict[str, str]:
        cache: dict[str, dict[str, str]] = self.__dict__.setdefault("_columns_cache", {})
        if table not in cache:
            database, name = _parse_table_name(table)
            rows = self.query(_COLUMNS_SQL, {"db": database, "table": name})
            if not rows:
                raise WarehouseQueryError(f"unknown table {table!r}")
            cache[table] = {row["name"]: row["type"] for row in rows}
        return cache[table]

    def _forget_columns(self) -> None:
        self.__dict__.pop("_columns_cache", None)


class _SqlEngine(Warehouse):
    """query, command and insert for engines that run SQL themselves (chDB, a server): the guard,
    error wrapping and result decoding live here; an engine supplies three primitives."""

    @abstractmethod
    def _query_parquet(self, statement: str, parameters: dict[str, Any] | None) -> bytes: ...

    @abstractmethod
    def _command(self, sql: str) -> None: ...

    @abstractmethod
    def _write(self, database: str | None, name: str, arrow: pa.Table) -> int: ...

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except WarehouseError:
            raise
        except Exception as exc:
            raise WarehouseQueryError(str(exc)) from None

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        data = self._call(self._query_parquet, ensure_read_only(sql) + READ_ONLY_SUFFIX, parameters)
        try:
            return _rows_from_parquet(data)
        except (pa.ArrowException, OSError) as exc:
            raise WarehouseQueryError(f"unreadable result (no FORMAT clause, please): {exc}") from None

    def command(self, sql: str) -> None:
        try:
            self._call(self._command, sql)
        finally:
            self._forget_columns()

    def insert_columns(self, table: str, columns: Mapping[str, Sequence[Any]]) -> int:
        if not columns or not len(next(iter(columns.values()))):
            return 0
        database, name = _parse_table_name(table)
        arrow = _arrow_table(table, columns, self._table_columns(table))
        return self._call(self._write, database, name, arrow)


# --------------------------------------------------------------------------------------------
# chDB

# chDB runs one engine per process: every call from this process goes through this lock.
_CHDB_LOCK = threading.Lock()
# The open EmbeddedWarehouses of this process (which paths are open; closed at interpreter exit if
# their owners forgot: chDB left open at exit can abort the process).
_chdb_instances: weakref.WeakSet[EmbeddedWarehouse] = weakref.WeakSet()


def _open_paths() -> set[Path]:
    return {w.path for w in list(_chdb_instances) if not w._closed}


@atexit.register
def _close_all_embedded() -> None:
    for warehouse in list(_chdb_instances):
        try:
            warehouse.close()
        except Exception:  # exiting anyway
            pass


def _status_pid(status: Path) -> int | None:
    try:
        for line in status.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "PID" and value.strip().isdigit():
                return int(value.strip())
    except OSError:
        pass
    return None


def _lock_holder(path: Path) -> tuple[bool, int | None]:
    """(held by another process, its pid if known). ClickHouse flock()s <data dir>/status."""
    status = path / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _status_pid(status)
            return pid != os.getpid(), pid
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


class EmbeddedWarehouse(_SqlEngine):
    """chDB on a data directory, owned by this process while open.

    Another process opening the same directory gets WarehouseLocked; opening a second, different
    directory in this process raises WarehousePathConflict until every EmbeddedWarehouse on the
    first one is closed (the same directory may be opened several times).
    """

    engine = "chdb"

    def __init__(self, path: str | os.PathLike[str], *, owner_file: Path | None = None, owner_url: str | None = None):
        self.path = Path(path).expanduser().resolve()
        if "?" in str(self.path):
            raise ValueError("a chDB path may not contain '?'")
        import chdb  # imported here: it is a large library, and ServerWarehouse users never need it

        self._closed = True
        self._owner_file: Path | None = None
        with _CHDB_LOCK:
            open_paths = _open_paths()
            others = sorted(open_paths - {self.path})
            if others:
                raise WarehousePathConflict(
                    f"this process already has chDB open at {others[0]}; chDB opens one data directory "
                    f"per process: close it before opening {self.path}"
                )
            if self.path not in open_paths:
                held, pid = _lock_holder(self.path)
                if held:
                    raise WarehouseLocked(self.path, pid)
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                self._conn = chdb.connect(f"{self.path}?session_timezone=UTC")
            except Exception as exc:  # chDB raises a bare RuntimeError
                raise self._open_error(exc) from None
            self._closed = False
            _chdb_instances.add(self)
        if owner_file is not None:
            try:
                self._claim(owner_file, owner_url)
            except BaseException:
                self.close()
                raise

    def _open_error(self, exc: Exception) -> WarehouseError:
        message = str(exc)
        if "already initialized with path" in message:
            return WarehousePathConflict(f"chDB is already open in this process on another path: {message}")
        held, pid = _lock_holder(self.path)
        if held:
            return WarehouseLocked(self.path, pid)
        return WarehouseError(f"cannot open chDB at {self.path}: {message}")

    def _claim(self, owner_file: Path, owner_url: str | None) -> None:
        owner_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = owner_file.with_name(f".{owner_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "url": owner_url}))
        tmp.replace(owner_file)
        self._owner_file = owner_file

    def _release_claim(self) -> None:
        owner_file, self._owner_file = self._owner_file, None
        if owner_file is None:
            return
        try:
            if json.loads(owner_file.read_text()).get("pid") == os.getpid():
                owner_file.unlink()
        except (OSError, ValueError):
            pass

    @contextmanager
    def _engine(self) -> Iterator[Any]:
        with _CHDB_LOCK:
            if self._closed:
                raise WarehouseError(f"the warehouse at {self.path} is closed")
            yield self._conn

    def _query_parquet(self, statement: str, parameters: dict[str, Any] | None) -> bytes:
        params = encode_parameters(parameters)
        with self._engine() as conn:
            return conn.query(statement, "Parquet", params=params).bytes()

    def _command(self, sql: str) -> None:
        with self._engine() as conn:
            conn.query(sql, "Null")

    def _write(self, database: str | None, name: str, arrow: pa.Table) -> int:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, arrow.schema) as writer:
            writer.write_table(arrow)
        payload = sink.getvalue().to_pybytes()
        target = f"`{database}`.`{name}`" if database else f"`{name}`"
        columns = ", ".join(f"`{c}`" for c in arrow.column_names)
        with self._engine() as conn:
            inserter = conn.send_insert(f"INSERT INTO {target} ({columns})", "ArrowStream")
            try:
                inserter.append(payload)
                inserter.finish()
                # Not the engine's rows_written: that also counts what materialized views wrote.
                return arrow.num_rows
            except Exception:
                try:
                    inserter.cancel()
                except Exception:  # the engine already gave up on the insert
                    pass
                raise

    def close(self) -> None:
        with _CHDB_LOCK:
            if self._closed:
                return
            self._closed = True
            _chdb_instances.discard(self)
            self._conn.close()
        self._release_claim()

    def __repr__(self) -> str:
        return f"EmbeddedWarehouse({str(self.path)!r})"


# --------------------------------------------------------------------------------------------
# ClickHouse server


class _BoundText:
    """A parameter already encoded by encode_parameters: clickhouse-connect sends str(value) as is,
    so both engines receive byte-identical parameter text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"_BoundText({self.text!r})"


# What chDB 26.9 does by default; older servers may default otherwise.
_SERVER_PARQUET_SETTINGS = {"output_format_parquet_string_as_string": 1, "output_format_parquet_datetime_as_uint32": 0}


class ServerWarehouse(_SqlEngine):
    """A ClickHouse server via clickhouse-connect; the client connects on first use."""

    engine = "clickhouse"

    def __init__(self, url: str, **client_options: Any) -> None:
        self.url = url
        self._options = {"autogenerate_session_id": False, **client_options}
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import clickhouse_connect

                try:
                    self._client = clickhouse_connect.get_client(dsn=self.url, **self._options)
                except Exception as exc:
                    raise WarehouseError(f"cannot connect to ClickHouse at {_redact(self.url)}: {exc}") from None
            return self._client

    @staticmethod
    def server_parameters(statement: str, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        encoded = encode_parameters(parameters)
        if not encoded or not _PLACEHOLDER.search(statement):
            # Without {name:Type} placeholders clickhouse-connect would format the values into the
            # SQL text: never do that (the engine ignores unused parameters anyway).
            return None
        return {name: _BoundText(text) for name, text in encoded.items()}

    def _query_parquet(self, statement: str, parameters: dict[str, Any] | None) -> bytes:
        bound = self.server_parameters(statement, parameters)
        # Sent as request settings, applied before the query's own SETTINGS readonly=1.
        return self.client.raw_query(statement, parameters=bound, settings=_SERVER_PARQUET_SETTINGS, fmt="Parquet")

    def _command(self, sql: str) -> None:
        self.client.command(sql)

    def _write(self, database: str | None, name: str, arrow: pa.Table) -> int:
        self.client.insert_arrow(name, arrow, database=database)
        return arrow.num_rows

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"ServerWarehouse({_redact(self.url)!r})"


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


# --------------------------------------------------------------------------------------------
# The owner's SQL endpoint and its client


class RemoteWarehouse(Warehouse):
    """Read-only client of an owner's `POST /sql` (see sql_routes). Values come back as JSON:
    datetimes as ISO 8601 strings, non-UTF-8 bytes as base64."""

    engine = "remote"

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def health(self, timeout: float = 2.0) -> bool:
        import httpx

        try:
            response = self._http.get("/sql/health", timeout=timeout)
            return response.status_code == 200 and response.json().get("ok") is True
        except (httpx.HTTPError, ValueError):
            return False

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        import httpx

        ensure_read_only(sql)
        body = {"sql": sql, "parameters": _jsonable_parameters(parameters)}
        try:
            response = self._http.post("/sql", json=body)
        except httpx.HTTPError as exc:
            raise WarehouseError(f"SQL endpoint {self.base_url} unreachable: {exc}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code != 200 or "rows" not in payload:
            error = payload.get("error") or f"HTTP {response.status_code}"
            kind = ReadOnlyWarehouse if payload.get("type") == "ReadOnlyWarehouse" else WarehouseQueryError
            raise kind(error)
        return payload["rows"]

    def command(self, sql: str) -> None:
        raise ReadOnlyWarehouse(f"{self.base_url} is a read-only SQL endpoint: commands run in the owner")

    def insert(self, table: str, rows: list[dict[str, Any]]) -> int:
        return self.insert_columns(table, {})

    def insert_columns(self, table: str, columns: Mapping[str, Sequence[Any]]) -> int:
        raise ReadOnlyWarehouse(f"{self.base_url} is a read-only SQL endpoint: inserts run in the owner")

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"RemoteWarehouse({self.base_url!r})"


def _error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": message, "type": kind}, status=status)


def sql_routes(warehouse: Warehouse) -> web.RouteTableDef:
    """`GET /sql/health` → {"ok": true}; `POST /sql` {"sql", "parameters"} → {"rows": [...]}.

    Only read-only statements run (400 {"error", "type"} otherwise, or when the query fails). The
    query and the JSON encoding run in a thread, so the event loop never waits on chDB.
    Mount with `app.add_routes(sql_routes(warehouse))`.
    """
    routes = web.RouteTableDef()

    @routes.get("/sql/health")
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "engine": warehouse.engine})

    @routes.post("/sql")
    async def run_sql(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error_response(400, 'the body must be JSON: {"sql": "...", "parameters": {...}}', "BadRequest")
        if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
            return _error_response(400, 'the body must be a JSON object with a "sql" string', "BadRequest")
        parameters = body.get("parameters") or None
        if parameters is not None and not isinstance(parameters, dict):
            return _error_response(400, '"parameters" must be a JSON object', "BadRequest")
        try:
            ensure_read_only(body["sql"])
            text = await asyncio.to_thread(_run_and_encode, warehouse, body["sql"], parameters)
        except WarehouseError as exc:
            return _error_response(400, str(exc), type(exc).__name__)
        return web.Response(text=text, content_type="application/json")

    return routes


def _run_and_encode(warehouse: Warehouse, sql: str, parameters: dict[str, Any] | None) -> str:
    rows = warehouse.query(sql, parameters)
    return json.dumps({"rows": json_safe(rows)}, ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Choosing an engine


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(settings: Settings) -> dict[str, Any] | None:
    """The live owner's {"pid", "url"} from run_dir/warehouse.json, or None."""
    try:
        info = json.loads((settings.run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _pid_alive(info.get("pid")) or not isinstance(info.get("url"), str):
        return None
    return info


def connect(settings: Settings, *, owner: bool = False) -> Warehouse:
    """The warehouse for this process.

    - settings.clickhouse_url set: a ClickHouse server (owner or not).
    - owner: chDB on settings.chdb_path, advertised in settings.run_dir/warehouse.json
      ({"pid", "url": settings.http_base}) until closed; the owner serves sql_routes on that URL.
    - reader: the owner's endpoint if warehouse.json names a live process whose /sql/health
      answers; otherwise chDB directly (nobody owns it; this process holds it until closed).
    """
    if settings.clickhouse_url:
        return ServerWarehouse(settings.clickhouse_url)
    if owner:
        return EmbeddedWarehouse(
            settings.chdb_path, owner_file=settings.run_dir / OWNER_FILE, owner_url=settings.http_base
        )
    info = read_owner(settings)
    if info is not None:
        remote = RemoteWarehouse(info["url"], timeout=30.0)
        if remote.health():
            return remote
        remote.close()
    try:
        return EmbeddedWarehouse(settings.chdb_path)
    except WarehouseLocked as exc:
        if info is not None:
            raise WarehouseLocked(
                exc.path, exc.pid, f"(its owner {info['pid']} did not answer on {info['url']}/sql/health)"
            ) from None
        raise


# --------------------------------------------------------------------------------------------
# Schema and helpers

_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY version
"""


def migrate(warehouse: Warehouse, migrations: Sequence[Migration] | None = None) -> list[str]:
    """Apply the migrations not yet recorded in schema_migrations, in order; their names."""
    warehouse.command(_MIGRATIONS_DDL)
    applied = {row["version"] for row in warehouse.query("SELECT DISTINCT version FROM schema_migrations")}
    done: list[str] = []
    for migration in bundled_migrations() if migrations is None else migrations:
        if migration.version in applied:
            continue
        for statement in split_statements(migration.sql):
            try:
                warehouse.command(statement)
            except WarehouseQueryError as exc:
                raise WarehouseQueryError(f"migration {migration.name} failed: {exc}") from None
        warehouse.insert("schema_migrations", [{"version": migration.version, "name": migration.name}])
        log.info("applied migration %s", migration.name)
        done.append(migration.name)
    return done


OUTCOME_COLUMNS = (
    "message_id", "campaign_id", "user_id", "channel", "code", "stage", "reason", "provider",
    "provider_message_id", "triggered_at", "occurred_at", "variant", "attempt", "fallback_of",
)  # fmt: skip
DEAD_LETTER_COLUMNS = (
    "stage", "topic", "partition", "offset", "reason", "error_type", "key", "original", "occurred_at",
)  # fmt: skip


_outcome_values = operator.attrgetter(*OUTCOME_COLUMNS)


def outcome_row(outcome: Outcome) -> dict[str, Any]:
    return {name: values[0] for name, values in outcome_columns([outcome]).items()}


def outcome_columns(outcomes: Sequence[Outcome]) -> dict[str, list[Any]]:
    if not outcomes:
        return {name: [] for name in OUTCOME_COLUMNS}
    columns = dict(zip(OUTCOME_COLUMNS, map(list, zip(*map(_outcome_values, outcomes), strict=True)), strict=True))
    columns["code"] = [code.value for code in columns["code"]]
    return columns


def dead_letter_row(letter: DeadLetter) -> dict[str, Any]:
    return {name: getattr(letter, name) for name in DEAD_LETTER_COLUMNS}


def insert_outcomes(warehouse: Warehouse, outcomes: Sequence[Outcome]) -> int:
    return warehouse.insert_columns("outcomes", outcome_columns(outcomes))


def insert_dead_letters(warehouse: Warehouse, letters: Sequence[DeadLetter]) -> int:
    return warehouse.insert("dead_letters", [dead_letter_row(d) for d in letters])


def insert_alerts(warehouse: Warehouse, alerts: Sequence[Alert]) -> int:
    return warehouse.insert("alerts", [{**a.model_dump(), "severity": a.severity.value} for a in alerts])


def insert_user_events(warehouse: Warehouse, events: Sequence[Event]) -> int:
    rows = [
        {
            "user_id": e.user_id,
            "event_type": e.event_type,
            "occurred_at": e.occurred_at,
            "properties": orjson.dumps(e.properties).decode(),  # compact UTF-8, as json.dumps gave at 5x the cost
        }
        for e in events
    ]
    return warehouse.insert("user_events", rows)


def insert_user_attributes(warehouse: Warehouse, profiles: Sequence[dict[str, Any]]) -> int:
    """Whole rows (user_attributes is replaced per user), whitelisted attributes typed, others left out."""
    from connectors.profiles import typed_attributes
    from schemas.segments import ATTRIBUTES

    rows = [{**dict.fromkeys(ATTRIBUTES), **typed_attributes(p), "user_id": str(p["user_id"])} for p in profiles]
    return warehouse.insert("user_attributes", rows)


def insert_tag_changes(warehouse: Warehouse, changes: Sequence[TagChange]) -> int:
    """History into user_tag_changes, and user_tags kept current (what ClickHouse segment counts
    read between two runs of the tags job)."""
    import sqlglot.expressions as exp

    latest = {(c.user_id, c.tag): c.change.value for c in changes}  # the last change per tag wins
    removed = [key for key, change in latest.items() if change == "removed"]
    if removed:
        # Literals quoted by sqlglot, never pasted: user ids and tags come from outside.
        where = exp.or_(
            *(
                exp.and_(exp.column("user_id").eq(exp.Literal.string(u)), exp.column("tag").eq(exp.Literal.string(t)))
                for u, t in removed
            )
        )
        warehouse.command(exp.delete("user_tags", where=where).sql(dialect="clickhouse"))
    added = [{"user_id": u, "tag": t} for (u, t), change in latest.items() if change == "added"]
    if added:
        warehouse.insert("user_tags", added)
    return warehouse.insert("user_tag_changes", [{**c.model_dump(), "change": c.change.value} for c in changes])


def funnel(warehouse: Warehouse, campaign_id: str | None = None) -> list[dict[str, Any]]:
    """Rows of the campaign_funnel view (README.md), one campaign or all, by campaign_id."""
    if campaign_id is None:
        return warehouse.query("SELECT * FROM campaign_funnel ORDER BY campaign_id")
    return warehouse.query(
        "SELECT * FROM campaign_funnel WHERE campaign_id = {campaign_id:String}", {"campaign_id": campaign_id}
    )
