"""ClickHouse schema for Loopcast: numbered migrations applied by connectors.warehouse.migrate().

Each NNN_name.sql file holds one or more statements separated by `;`. Statements must be idempotent
(IF NOT EXISTS / OR REPLACE) so a run interrupted inside a file can be repeated. README.md documents
every table and view column: it is the public reporting interface.
"""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every numbered migration shipped with the package, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files(__name__).iterdir():
        file_name = entry.name
        if not file_name.endswith(".sql"):
            continue
        prefix, sep, rest = file_name.partition("_")
        if not (sep and prefix.isdigit()):
            raise ValueError(f"migration file {file_name!r} must be named NNN_name.sql")
        version = int(prefix)
        if version in found:
            raise ValueError(f"two migrations share version {version}: {found[version].name}, {file_name}")
        found[version] = Migration(version, file_name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]
