"""Uploaded user packages (audience lists): a CSV or TXT file, maybe gzipped, read line by line,
validated and deduplicated with every problem reported by line number, then stored in Redis."""

from __future__ import annotations

import csv
import gzip
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from connectors.audience_store import AudienceStore

ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@-")
MAX_ID_LEN = 200
# Above this share of bad lines the file is probably the wrong one (or the wrong column): refuse it.
MAX_BAD_SHARE = 0.05
# How much of the shown text of a bad line is kept.
TEXT_CLIP = 80

Format = Literal["csv", "txt"]


class PackageError(ValueError):
    """The file cannot be read as a package at all (no user_id column, unknown format)."""


class PackageRefused(Exception):
    """The file was read but not stored; the report says why and which lines are at fault."""

    def __init__(self, report: PackageReport) -> None:
        super().__init__(report.refused_reason)
        self.report = report


class PackageReport(BaseModel):
    package_id: str | None = None
    format: Format
    # Every physical line read, the header and blank lines included.
    lines: int = 0
    blank: int = 0
    # Distinct valid ids.
    valid: int = 0
    # Repeats of an id already seen, and a sample of them: (user id, first line, repeating line).
    duplicates: int = 0
    duplicate_sample: list[tuple[str, int, int]] = Field(default_factory=list)
    # Every bad line is counted; the first `max_bad_listed` are listed as (line, reason, text).
    bad_count: int = 0
    bad: list[tuple[int, str, str]] = Field(default_factory=list)
    bad_share: float = 0.0
    # Valid ids the id map does not know; None until checked against the store.
    unknown: int | None = None
    unknown_sample: list[str] = Field(default_factory=list)
    keep_unknown: bool = False
    stored: int = 0
    refused: bool = False
    refused_reason: str | None = None
    parse_seconds: float = 0.0
    store_seconds: float = 0.0

    @property
    def data_lines(self) -> int:
        return self.valid + self.duplicates + self.bad_count


def detect_format(path: Path) -> Format:
    """By extension, a trailing .gz aside: .csv is CSV, anything else one id per line."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return "csv" if suffixes and suffixes[-1] == ".csv" else "txt"


def open_text(path: Path) -> io.TextIOBase:
    """Text, decoded as UTF-8 (a BOM dropped); undecodable bytes become U+FFFD and fail validation."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8-sig", errors="replace", newline="")  # noqa: SIM115 - the caller closes it


def why_invalid(user_id: str) -> str:
    """The reason an id fails ID_RE, in words a person uploading a file can act on."""
    if not user_id:
        return "empty user_id"
    if len(user_id) > MAX_ID_LEN:
        return f"longer than {MAX_ID_LEN} characters ({len(user_id)})"
    for column, char in enumerate(user_id, start=1):
        if char not in ALLOWED:
            return f"character {char!r} at column {column} is not allowed (A-Z a-z 0-9 _ . : @ -)"
    return "invalid"


class _Rows:
    """(line number, id or None for a blank line, raw text) of a package file; `lines` counts every
    physical line read so far, a header included."""

    def __init__(self, handle: io.TextIOBase, fmt: Format) -> None:
        self.handle, self.fmt, self.lines = handle, fmt, 0

    def __iter__(self) -> Iterator[tuple[int, str | None, str]]:
        return self._csv() if self.fmt == "csv" else self._txt()

    def _txt(self) -> Iterator[tuple[int, str | None, str]]:
        for number, line in enumerate(self.handle, start=1):
            self.lines = number
            value = line.strip()
            # A lone `user_id` first line is a header.
            if number == 1 and value.lower() == "user_id":
                continue
            yield number, value or None, value

    def _csv(self) -> Iterator[tuple[int, str | None, str]]:
        reader = csv.reader(self.handle)
        header = next(reader, None)
        self.lines = reader.line_num
        names = [h.strip().lower() for h in header or []]
        if "user_id" not in names:
            raise PackageError(f"the CSV header has no user_id column (found {names[:10]})")
        column = names.index("user_id")
        for row in reader:
            number = self.lines = reader.line_num
            if not any(field.strip() for field in row):
                yield number, None, ""
            elif column >= len(row):
                yield number, "", ",".join(row)
            else:
                yield number, row[column].strip(), ",".join(row)


def parse_package(
    path: Path, *, fmt: Format | None = None, sample: int = 20, max_bad_listed: int = 1000
) -> tuple[list[str], PackageReport]:
    """The distinct valid ids in file order, and the report. Streams the file; memory grows with the
    number of distinct ids (one dict entry each, for deduplication), not with the file."""
    started = time.perf_counter()
    fmt = fmt or detect_format(path)
    report = PackageReport(format=fmt)
    first_line: dict[str, int] = {}
    bad: list[tuple[int, str, str]] = []
    duplicates: list[tuple[str, int, int]] = []
    bad_count = duplicate_count = blank = 0
    fullmatch = ID_RE.fullmatch
    with open_text(path) as handle:
        rows = _Rows(handle, fmt)
        for number, user_id, text in rows:
            if user_id is None:
                blank += 1
            elif fullmatch(user_id) is None:
                bad_count += 1
                if len(bad) < max_bad_listed:
                    bad.append((number, why_invalid(user_id), text[:TEXT_CLIP]))
            elif user_id in first_line:
                duplicate_count += 1
                if len(duplicates) < sample:
                    duplicates.append((user_id, first_line[user_id], number))
            else:
                first_line[user_id] = number
    ids = list(first_line)
    report.lines, report.blank, report.valid = rows.lines, blank, len(ids)
    report.duplicates, report.duplicate_sample = duplicate_count, duplicates
    report.bad_count, report.bad = bad_count, bad
    report.bad_share = bad_count / report.data_lines if report.data_lines else 0.0
    report.parse_seconds = time.perf_counter() - started
    return ids, report


def refusal(report: PackageReport, max_bad_share: float) -> str | None:
    if report.bad_share > max_bad_share:
        return (
            f"{report.bad_count} of {report.data_lines} lines are bad ({report.bad_share:.1%}, "
            f"more than {max_bad_share:.1%}): fix the file or raise the threshold"
        )
    if report.valid == 0:
        return "no valid user id in the file: nothing to store (an empty upload would wipe the package)"
    return None


async def upload_package(
    store: AudienceStore,
    package_id: str,
    path: Path,
    *,
    keep_unknown: bool = False,
    max_bad_share: float = MAX_BAD_SHARE,
    fmt: Format | None = None,
    sample: int = 20,
) -> PackageReport:
    """Parse, check against the id map, and replace the package. Raises PackageRefused (with the
    report) before anything is written when too many lines are bad or no id is valid."""
    ids, report = parse_package(path, fmt=fmt, sample=sample)
    report.package_id, report.keep_unknown = package_id, keep_unknown
    reason = refusal(report, max_bad_share)
    if reason:
        report.refused, report.refused_reason = True, reason
        raise PackageRefused(report)
    started = time.perf_counter()
    known = await store.ids_for(ids, create=False)
    unknown = [user_id for user_id, n in zip(ids, known, strict=True) if n is None]
    report.unknown, report.unknown_sample = len(unknown), unknown[:sample]
    if unknown and not keep_unknown:
        ids = [user_id for user_id, n in zip(ids, known, strict=True) if n is not None]
        if not ids:
            report.refused, report.refused_reason = True, "every valid id is unknown (pass keep_unknown to store them)"
            raise PackageRefused(report)
    report.stored = await store.put_package(package_id, ids)
    report.store_seconds = time.perf_counter() - started
    return report
