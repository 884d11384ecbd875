"""Package files: every bad line reported with its number and reason, duplicates and unknown ids
counted, gzip, refusal above the bad-line threshold, and a million lines parsed quickly."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest

from connectors.audience_store import AudienceStore
from connectors.packages import PackageError, PackageRefused, detect_format, parse_package, upload_package
from tests.connectors.test_audience_store import redis_url, run  # noqa: F401 - the private Redis fixture

TXT = """user_id
alice
bob

carol@example.com
bad id
alice
 dave:7 \r
{}
bob
émile
""".format("x" * 201)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


@pytest.mark.unit
def test_txt_reports_bad_lines_duplicates_and_blanks_by_line_number(tmp_path: Path) -> None:
    ids, report = parse_package(write(tmp_path, "users.txt", TXT))
    assert ids == ["alice", "bob", "carol@example.com", "dave:7"]
    assert (report.format, report.lines, report.blank, report.valid) == ("txt", 11, 1, 4)
    assert report.duplicates == 2 and report.duplicate_sample == [("alice", 2, 7), ("bob", 3, 10)]
    assert [(line, text[:6]) for line, _, text in report.bad] == [(6, "bad id"), (9, "xxxxxx"), (11, "émile")]
    reasons = [reason for _, reason, _ in report.bad]
    assert "' '" in reasons[0] and "column 4" in reasons[0]
    assert "longer than 200" in reasons[1] and "'é'" in reasons[2]
    assert report.bad_count == 3 and report.bad_share == pytest.approx(3 / 9)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["users.csv", "users.csv.gz"])
def test_csv_takes_the_user_id_column_plain_or_gzipped(tmp_path: Path, name: str) -> None:
    text = 'email,User_Id,name\r\na@x.io,u1,"Ann, B"\r\nb@x.io,u2,Bo\r\n,,\r\nshort\r\nc@x.io,u1,C\r\nd@x.io,,D\r\n'
    ids, report = parse_package(write(tmp_path, name, text))
    assert detect_format(tmp_path / name) == "csv" and ids == ["u1", "u2"]
    assert report.lines == 7 and report.blank == 1 and report.duplicate_sample == [("u1", 2, 6)]
    assert [(line, reason) for line, reason, _ in report.bad] == [(5, "empty user_id"), (7, "empty user_id")]


@pytest.mark.unit
def test_gzipped_txt_and_a_csv_without_user_id_column(tmp_path: Path) -> None:
    ids, report = parse_package(write(tmp_path, "users.txt.gz", "a\nb\na\n"))
    assert ids == ["a", "b"] and report.duplicates == 1 and report.lines == 3
    with pytest.raises(PackageError, match="no user_id column"):
        parse_package(write(tmp_path, "users.csv", "email,name\na@x.io,A\n"))


@pytest.mark.unit
def test_a_million_lines_parse_in_a_few_seconds(tmp_path: Path) -> None:
    path = tmp_path / "million.txt.gz"
    with gzip.open(path, "wt", compresslevel=1) as handle:
        handle.writelines(f"user-{i % 900_000}\n" if i % 1000 else "not valid!\n" for i in range(1_000_000))
    started = time.perf_counter()
    ids, report = parse_package(path)
    seconds = time.perf_counter() - started
    print(f"parsed 1,000,000 gzipped lines in {seconds:.2f}s ({1_000_000 / seconds:,.0f} lines/s)")
    assert report.lines == 1_000_000 and report.bad_count == 1000 and len(report.bad) == 1000
    assert report.valid == len(ids) == 900_000 - 900 and report.duplicates == 1_000_000 - 1000 - report.valid
    assert seconds < 10


@pytest.mark.integration
def test_upload_drops_or_keeps_unknown_ids_and_refuses_bad_files(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    good = write(tmp_path, "good.txt", "alice\nbob\nzed\nalice\nyan\n")
    mostly_bad = write(tmp_path, "bad.txt", "alice\nbob\n" + "no good\n" * 2 + "carol\n" * 40)
    empty = write(tmp_path, "empty.csv", "user_id\n\n")

    async def scenario(store: AudienceStore) -> None:
        await store.ids_for(["alice", "bob", "carol"])
        report = await upload_package(store, "p1", good)
        assert (report.valid, report.unknown, report.unknown_sample, report.stored) == (4, 2, ["zed", "yan"], 2)
        assert await store.in_package("p1", ["alice", "bob", "zed"]) == [True, True, False]
        kept = await upload_package(store, "p1", good, keep_unknown=True)
        assert kept.stored == 4 and await store.package_size("p1") == 4
        assert await store.ids_for(["zed"], create=False) != [None]
        # 2 bad lines out of 44 is over 4%: refused, the package as it was.
        with pytest.raises(PackageRefused) as refused:
            await upload_package(store, "p1", mostly_bad, max_bad_share=0.04)
        assert refused.value.report.refused and [b[0] for b in refused.value.report.bad] == [3, 4]
        assert await store.package_size("p1") == 4
        assert (await upload_package(store, "p1", mostly_bad)).stored == 3
        with pytest.raises(PackageRefused, match="no valid user id"):
            await upload_package(store, "p1", empty)
        assert await store.package_size("p1") == 3

    run(redis_url, scenario)


@pytest.mark.integration
def test_upload_a_million_line_file(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    """End to end on 1M lines (all ids new, kept): parse, id map, SET and bitmap."""
    path = tmp_path / "big.csv"
    with path.open("w") as handle:
        handle.write("user_id,score\n")
        handle.writelines(f"big-{i},{i % 7}\n" for i in range(1_000_000))

    async def scenario(store: AudienceStore) -> object:
        report = await upload_package(store, "big", path, keep_unknown=True)
        assert report.stored == 1_000_000 and await store.size(("package", "big")) == 1_000_000
        return report

    report = run(redis_url, scenario)
    print(f"uploaded 1M ids: parse {report.parse_seconds:.2f}s, store {report.store_seconds:.2f}s")  # type: ignore[attr-defined]


@pytest.mark.integration
def test_cli_upload_prints_the_report_and_exits_2_when_refused(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from console.audience_cli import package_app

    monkeypatch.setenv("LOOPCAST_REDIS_URL", redis_url)
    run(redis_url, lambda store: store.ids_for(["a", "b"]))
    runner = CliRunner()
    ok = runner.invoke(package_app, ["upload", "vip", str(write(tmp_path, "ok.txt", "a\nb\nb\nghost\n"))])
    assert ok.exit_code == 0, ok.output
    assert "duplicates" in ok.output and "ghost" in ok.output and "dropped" in ok.output
    assert runner.invoke(package_app, ["size", "vip"]).output.strip() == "2"
    refused = runner.invoke(package_app, ["upload", "vip", str(write(tmp_path, "bad.txt", "a\nno way\n"))])
    assert refused.exit_code == 2 and "no way" in refused.output
