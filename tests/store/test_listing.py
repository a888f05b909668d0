"""A data prefix's files: split from what is not data in one pass, selected for tonight, pinned for retries (pure)."""
import datetime as dt

import pytest

from job.errors import DataError
from job.store.listing import ALL, DataFile, Selection, data_files, dated_ahead, key_date, parse_selection, pin, pinned, select

TODAY = dt.date(2026, 11, 30)
DAY = 86400.0


def at(day: dt.date, hour: int = 12) -> float:
    return dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.timezone.utc).timestamp()


def files(*specs):
    """(key, days before TODAY it was modified) -> DataFiles in key order, as a listing gives them."""
    return sorted((DataFile(key, 10, "etag", at(TODAY - dt.timedelta(days=ago))) for key, ago in specs), key=lambda f: f.key)


@pytest.mark.parametrize("text, expected", [
    ("all", ALL), (" ALL ", ALL),
    ("newest:7", Selection("newest", 7, "key")), ("newest:7:key", Selection("newest", 7, "key")),
    ("Newest:3:Modified", Selection("newest", 3, "modified")),
    ("days:30", Selection("days", 30, "key")), ("days:1:modified", Selection("days", 1, "modified")),
])
def test_selection_spellings(text, expected):
    assert parse_selection(text) == expected
    assert parse_selection(str(expected)) == expected  # the normalised spelling reads back the same


@pytest.mark.parametrize("text", ["", "some", "newest", "newest:", "newest:0", "newest:-1", "newest:x", "days:2:mtime",
                                  "days:36501", "newest:7:key:x", "latest:3"])
def test_bad_selections_are_refused(text):
    with pytest.raises(ValueError, match="newest:N or days:D"):
        parse_selection(text)


@pytest.mark.parametrize("key, expected", [
    ("2026-11-30/part-0.jsonl", dt.date(2026, 11, 30)),
    ("dt=2026_11_29/x.parquet", dt.date(2026, 11, 29)),
    ("2026/11/28/x.csv", dt.date(2026, 11, 28)),
    ("export-20261127.jsonl", dt.date(2026, 11, 27)),
    ("2025-01-01/part-2026-11-26.jsonl", dt.date(2026, 11, 26)),  # the last date: the file's own
    ("2026-11-25/part-20261345.jsonl", dt.date(2026, 11, 25)),  # digits that are no date are passed over
    ("part-00001.jsonl", None), ("2026-1-5.jsonl", None), ("12026-11-30.jsonl", None),
])
def test_key_dates(key, expected):
    assert key_date(key) == expected


def test_data_and_skipped_in_one_pass():
    listing = files(("a/part-0.JSONL", 0), ("a/_SUCCESS", 0), (".tmp/part-1.jsonl", 0), ("a/.part-2.jsonl.crc", 0),
                    ("b.parquet", 0), ("c.txt", 0))
    data, skipped = data_files(listing, {".jsonl", ".parquet"})
    assert [f.key for f in data] == ["a/part-0.JSONL", "b.parquet"]
    assert [f.key for f in skipped] == [".tmp/part-1.jsonl", "a/.part-2.jsonl.crc", "a/_SUCCESS", "c.txt"]


LISTING = files(("2026-11-27/a.jsonl", 0), ("2026-11-28/b.jsonl", 9), ("2026-11-29/c.jsonl", 1), ("2026-11-30/d.jsonl", 3))


@pytest.mark.parametrize("text, expected", [
    ("all", ["2026-11-27/a.jsonl", "2026-11-28/b.jsonl", "2026-11-29/c.jsonl", "2026-11-30/d.jsonl"]),
    ("newest:2", ["2026-11-29/c.jsonl", "2026-11-30/d.jsonl"]),  # by key: the last two
    ("newest:9", ["2026-11-27/a.jsonl", "2026-11-28/b.jsonl", "2026-11-29/c.jsonl", "2026-11-30/d.jsonl"]),
    ("newest:2:modified", ["2026-11-27/a.jsonl", "2026-11-29/c.jsonl"]),  # modified 0 and 1 days ago; still in key order
    ("days:1", ["2026-11-30/d.jsonl"]),  # today only
    ("days:3", ["2026-11-28/b.jsonl", "2026-11-29/c.jsonl", "2026-11-30/d.jsonl"]),
    ("days:2:modified", ["2026-11-27/a.jsonl", "2026-11-29/c.jsonl"]),
    ("days:4:modified", ["2026-11-27/a.jsonl", "2026-11-29/c.jsonl", "2026-11-30/d.jsonl"]),
])
def test_select(text, expected):
    assert [f.key for f in select(LISTING, parse_selection(text), TODAY, "s3://b/drops/")] == expected


def test_days_by_key_needs_a_date_in_every_key():
    with pytest.raises(DataError) as info:
        select(files(("2026-11-30/a.jsonl", 0), ("latest.jsonl", 0)), parse_selection("days:7"), TODAY, "s3://b/drops/")
    assert "latest.jsonl" in str(info.value) and "days:7:modified" in str(info.value) and str(info.value).startswith("s3://b/drops/")


def test_a_pin_reads_back_exactly():
    read = [DataFile("2026-11-30/d.jsonl", 120, '"9b2cf535f27731c974343645a3985328"', at(TODAY) + 0.25, "ab" * 32)]
    record = pin("s3://b/drops/", "newest:1", read)
    assert pinned(record, "s3://b/drops/") == read
    assert pinned(record, "s3://b/other/") is None  # pinned for another URI: not this split's


@pytest.mark.parametrize("spoil", [
    lambda r: r.update(files=[]),
    lambda r: r.update(files="x"),
    lambda r: r["files"][0].update(sha256="zz"),
    lambda r: r["files"][0].update(size=-1),
    lambda r: r["files"][0].update(size="10"),
    lambda r: r["files"][0].update(key=""),
    lambda r: r["files"][0].update(modified="yesterday"),
    lambda r: r["files"][0].update(extra=1),
    lambda r: r["files"][0].pop("etag"),
    lambda r: r["files"].append(None),
])
def test_a_spoiled_pin_is_not_used(spoil):
    record = pin("d/", "all", [DataFile("a.jsonl", 1, "", 0.0, "0" * 64)])
    spoil(record)
    assert pinned(record, "d/") is None


def _now(day: dt.date, hh: int, mm: int) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=dt.timezone.utc)


TOMORROW = TODAY + dt.timedelta(days=1)
AHEAD = files(("2026-11-29/a.jsonl", 1), ("2026-11-30/b.jsonl", 0), ("2026-12-01/c.jsonl", -1),
              ("2099-01-01/d.jsonl", -26000), ("part-7.jsonl", 0))


@pytest.mark.parametrize("text, now, expected", [
    # days:D by key kept the 2099 file every night; after today (UTC) is never chosen
    ("days:7", _now(TODAY, 12, 0), ["2026-12-01/c.jsonl", "2099-01-01/d.jsonl"]),
    # an hour before midnight a producer whose clock runs minutes ahead may already date tomorrow
    ("days:7", _now(TODAY, 23, 10), ["2099-01-01/d.jsonl"]),
    ("days:7", _now(TOMORROW, 0, 5), ["2099-01-01/d.jsonl"]),
    ("newest:2", _now(TODAY, 12, 0), ["2026-12-01/c.jsonl", "2099-01-01/d.jsonl"]),  # an undated key is ranked as before
    ("days:7:modified", _now(TODAY, 12, 0), ["2026-12-01/c.jsonl", "2099-01-01/d.jsonl"]),
    ("newest:1:modified", _now(TODAY, 23, 30), ["2099-01-01/d.jsonl"]),
    ("all", _now(TODAY, 12, 0), []),  # "all" dates nothing: every file, as it always was
])
def test_files_dated_after_today_are_never_selected(text, now, expected):
    assert [f.key for f in dated_ahead(AHEAD, parse_selection(text), now)] == expected


def test_a_modification_time_past_year_9999_is_in_the_future():
    far = DataFile("x.jsonl", 1, "", 1e15)
    assert dated_ahead([far], parse_selection("days:1:modified"), _now(TODAY, 12, 0)) == [far]


@pytest.mark.parametrize("modified", [1e15, 1_765_000_000.25])
def test_a_pin_reads_back_any_modification_time(modified):
    """QA_TRAIN_SELECT=all pins every file, whatever its date: one touched past year 9999 ended the run with exit 1."""
    f = DataFile("x.jsonl", 1, "", modified, "0" * 64)
    assert pinned(pin("/data", "all", [f]), "/data") == [f]
