"""Reading datasets: formats, ids, fingerprints, streaming memory, errors that say where."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import math
import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import fsspec
import fsspec.compression
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from shardeval.datasets import (
    SCHEMA,
    Dataset,
    _canonical_row,
    detect_format,
    read_dataset,
    redact_url,
)
from shardeval.errors import EXIT_USAGE, DatasetError
from shardeval.hashing import canonical_json, content_id
from shardeval.spec import DatasetSpec

ROWS: list[dict[str, Any]] = [
    {"id": 1, "question": "What is 1 + 1?", "answer": "2"},
    {"id": 2, "question": "Capital of France?", "answer": "Paris"},
    {"id": 3, "question": "Ünïcødé ✓?", "answer": "yes"},
]


@pytest.fixture(autouse=True)
def _clear_memory_fs() -> Iterator[None]:
    memory = fsspec.filesystem("memory")
    memory.store.clear()
    memory.pseudo_dirs[:] = [""]
    yield
    memory.store.clear()
    memory.pseudo_dirs[:] = [""]


def spec(**fields: Any) -> DatasetSpec:
    return DatasetSpec(path="unused", **fields)


def read(url: str | Path, **fields: Any) -> Dataset:
    limit = fields.pop("limit", None)
    return read_dataset(spec(**fields), str(url), limit=limit)


def jsonl_text(rows: list[Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def put(url: str, data: str | bytes) -> str:
    with fsspec.open(url, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return url


def error(url: str | Path, **fields: Any) -> str:
    with pytest.raises(DatasetError) as info:
        read(url, **fields)
    assert info.value.exit_code == EXIT_USAGE
    return str(info.value)


# -- formats ---------------------------------------------------------------------------------


def write_all_formats(tmp_path: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    paths = {fmt: tmp_path / f"data.{fmt}" for fmt in ("jsonl", "json", "csv", "parquet")}
    paths["jsonl"].write_text(jsonl_text(rows), encoding="utf-8")
    paths["json"].write_text(json.dumps(rows, indent=2), encoding="utf-8")
    table = pa.Table.from_pylist(rows)
    pa_csv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"])
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_gives_the_same_items(tmp_path: Path, fmt: str) -> None:
    path = write_all_formats(tmp_path, ROWS)[fmt]

    dataset = read(path, id_field="id")

    assert dataset.table.schema == SCHEMA
    assert len(dataset) == 3
    assert dataset.items() == ROWS
    assert dataset.ids() == ["1", "2", "3"]
    assert dataset.table.column("item_index").to_pylist() == [0, 1, 2]
    assert dataset.table.column("item_json").to_pylist() == [canonical_json(r) for r in ROWS]
    assert dataset.fields == {"id", "question", "answer"}
    assert dataset.url == str(path)


def test_same_items_in_another_format_have_the_same_fingerprint(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path, ROWS)
    fingerprints = {fmt: read(path).fingerprint for fmt, path in paths.items()}
    assert len(set(fingerprints.values())) == 1


def test_declared_format_overrides_the_extension() -> None:
    url = put("memory://data/items.txt", jsonl_text(ROWS))
    assert read(url, format="jsonl").items() == ROWS


def test_memory_url_jsonl_with_blank_lines_crlf_and_bom() -> None:
    text = "\ufeff" + json.dumps(ROWS[0]) + "\r\n\r\n   \n" + json.dumps(ROWS[1]) + "\r\n"
    dataset = read(put("memory://d/x.ndjson", text))
    assert dataset.items() == ROWS[:2]


def test_jsonl_lines_longer_than_a_read_block() -> None:
    long_row = {"text": "x" * 3_000_000}
    dataset = read(put("memory://d/long.jsonl", jsonl_text([long_row, ROWS[0], long_row])))
    assert dataset.items(1, 2) == [ROWS[0]]
    assert dataset.items(2)[0]["text"] == long_row["text"]


def test_jsonl_without_trailing_newline() -> None:
    dataset = read(put("memory://d/x.jsonl", jsonl_text(ROWS).rstrip("\n")))
    assert dataset.items() == ROWS


def test_gzip_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_text(ROWS).encode()))
    assert read(path).items() == ROWS


def test_gzip_csv_on_memory_url() -> None:
    url = put("memory://d/data.csv.gz", gzip.compress(b"q,a\nhi,1\nho,2\n"))
    assert read(url).items() == [{"q": "hi", "a": 1}, {"q": "ho", "a": 2}]


def test_csv_keeps_inferred_types_and_multiline_values(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('n,x,flag,text\n1,1.5,true,"two\nlines"\n2,,false,plain\n', encoding="utf-8")
    assert read(path).items() == [
        {"n": 1, "x": 1.5, "flag": True, "text": "two\nlines"},
        {"n": 2, "x": None, "flag": False, "text": "plain"},
    ]


def test_parquet_values_json_cannot_hold_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "day": pa.array([dt.date(2024, 1, 2)]),
            "at": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5)], pa.timestamp("us")),
            "price": pa.array([Decimal("1.50")], pa.decimal128(5, 2)),
            "blob": pa.array([b"\x00ab"]),
            "nested": pa.array([{"a": [1, 2]}]),
        }
    )
    pq.write_table(table, path)

    (item,) = read(path).items()

    assert item == {
        "day": "2024-01-02",
        "at": "2024-01-02 03:04:05",
        "price": "1.50",
        "blob": str(b"\x00ab"),
        "nested": {"a": [1, 2]},
    }


def test_parquet_over_memory_url_in_small_batches() -> None:
    rows = [{"i": i, "s": f"row {i}"} for i in range(25)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=7)
    url = put("memory://d/rows.pq", sink.getvalue().to_pybytes())
    dataset = read_dataset(spec(id_field="i"), url, chunk_rows=4)
    assert dataset.items() == rows
    assert dataset.table.column("item_json").num_chunks > 1


# -- format detection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("a.jsonl", "jsonl"),
        ("s3://bucket/dir/A.NDJSON", "jsonl"),
        ("a.jsonl.gz", "jsonl"),
        ("a.json", "json"),
        ("a.json.bz2", "json"),
        ("memory://x/a.csv", "csv"),
        ("a.csv.xz", "csv"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.jsonl.zst", "jsonl"),
        ("https://host/data.jsonl?token=abc", "jsonl"),
        ("simplecache::s3://bucket/x.csv", "csv"),
        ("zip://inner.parquet::s3://bucket/archive.zip", "parquet"),
    ],
)
def test_detect_format_by_extension(url: str, expected: str) -> None:
    assert detect_format(url, "auto") == expected


def test_detect_format_declared_wins() -> None:
    assert detect_format("a.txt", "csv") == "csv"


def test_unknown_extension_names_the_file_and_the_formats() -> None:
    with pytest.raises(DatasetError) as info:
        detect_format("memory://d/items.txt", "auto")
    message = str(info.value)
    assert "memory://d/items.txt" in message
    assert "'.txt'" in message
    for known in (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq", ".gz", ".zst"):
        assert known in message
    assert "dataset.format" in message  # the hint


def test_zstd_without_a_codec_says_what_to_install() -> None:
    if "zstd" in fsspec.compression.compr:
        pytest.skip("zstandard is installed")
    message = error(put("memory://d/x.jsonl.zst", b"\x28\xb5\x2f\xfd"))
    assert "memory://d/x.jsonl.zst" in message
    assert "zstandard" in message


# -- ids ---------------------------------------------------------------------------------------


def test_id_field_values_become_strings() -> None:
    rows = [{"id": 7, "q": "a"}, {"id": "x7", "q": "b"}, {"id": 7.5, "q": "c"}]
    assert read(put("memory://d/x.jsonl", jsonl_text(rows)), id_field="id").ids() == [
        "7",
        "x7",
        "7.5",
    ]


def test_content_ids_match_hashing_content_id() -> None:
    dataset = read(put("memory://d/x.jsonl", jsonl_text(ROWS)))
    assert dataset.ids() == [content_id(row) for row in ROWS]


def test_identical_rows_get_numbered_content_ids() -> None:
    a, b = {"q": "same"}, {"q": "other"}
    dataset = read(put("memory://d/x.jsonl", jsonl_text([a, b, a, a, b])))
    ha, hb = content_id(a), content_id(b)
    assert dataset.ids() == [ha, hb, f"{ha}-2", f"{ha}-3", f"{hb}-2"]


def test_missing_id_field_names_the_line() -> None:
    url = put("memory://d/x.jsonl", jsonl_text([{"id": 1}, {}, {"id": None}]))
    assert error(url, id_field="id").startswith("memory://d/x.jsonl:2: item has no 'id' field")
    assert "(id_field)" in error(url, id_field="id")


def test_missing_id_field_in_csv_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("key,q\n1,a\n,b\n", encoding="utf-8")
    assert error(path, id_field="key").startswith(f"{path}:row 2: item has no 'key' field")


def test_duplicate_ids_name_up_to_five_ids_and_their_lines() -> None:
    rows = [{"id": i % 7} for i in range(21)]  # 7 ids, each on three lines
    message = error(put("memory://d/x.jsonl", jsonl_text(rows)), id_field="id")
    assert "7 item ids appear more than once" in message
    assert "'0' at lines 1, 8, 15" in message
    assert "'4' at lines 5, 12, 19" in message
    assert "'5'" not in message
    assert "(and 2 more)" in message


def test_duplicate_ids_in_json_name_the_indexes(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"id": "a"}, {"id": "b"}, {"id": "a"}]), encoding="utf-8")
    message = error(path, id_field="id")
    assert "1 item id appears more than once (id_field 'id'): 'a' at [0], [2]" in message


# -- malformed files ---------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line() -> None:
    text = jsonl_text(ROWS[:2]) + "\n" + '{"id": 3, "q": }\n'
    message = error(put("memory://d/bad.jsonl", text))
    assert message.startswith("memory://d/bad.jsonl:4: not valid JSON: Expecting value")


def test_trailing_garbage_on_a_line_is_an_error() -> None:
    message = error(put("memory://d/bad.jsonl", '{"a": 1} {"b": 2}\n'))
    assert message.startswith("memory://d/bad.jsonl:1: not valid JSON: Extra data")


def test_non_object_line_names_the_type() -> None:
    message = error(put("memory://d/x.jsonl", '{"a": 1}\n[1, 2]\n'))
    assert message == "memory://d/x.jsonl:2: expected a JSON object, got list"


def test_invalid_utf8_names_the_line() -> None:
    url = put("memory://d/x.jsonl", b'{"a": 1}\n{"a": "\xff"}\n')
    assert error(url).startswith("memory://d/x.jsonl:2: not valid UTF-8")


def test_lone_surrogate_names_the_line() -> None:
    url = put("memory://d/x.jsonl", '{"a": 1}\n{"a": "\\ud800"}\n')
    assert error(url).startswith("memory://d/x.jsonl:2: item contains text that is not valid")


def test_json_non_object_element_names_its_index(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[{"a": 1}, {"a": 2}, "three"]', encoding="utf-8")
    assert error(path) == f"{path}:[2]: expected a JSON object, got string"


def test_json_that_is_not_an_array(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}', encoding="utf-8")
    assert "expected a JSON array of objects, got object" in error(path)


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[\n{"a": 1},\n{"a": }\n]', encoding="utf-8")
    assert error(path).startswith(f"{path}:3: not valid JSON")


def test_malformed_csv_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n3,4,5\n", encoding="utf-8")
    assert error(path).startswith(f"{path}: not valid CSV")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("hello", encoding="utf-8")
    assert error(path).startswith(f"{path}: not a valid Parquet file")


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    assert str(path) in error(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError) as info:
        read(path)
    assert info.value.message == f"dataset not found: {path}"
    assert info.value.hint and "dataset.path" in info.value.hint


def test_missing_memory_file() -> None:
    assert error("memory://d/nope.csv").startswith("dataset not found: memory://d/nope.csv")


def test_credentials_never_appear_in_messages_or_url() -> None:
    assert redact_url("s3://KEY:SECRET@bucket/x.jsonl") == "s3://bucket/x.jsonl"
    assert redact_url("https://h/x.jsonl?sig=abc&v=1") == "https://h/x.jsonl?sig=***&v=***"
    assert redact_url("simplecache::s3://u:p@b/x.csv") == "simplecache::s3://b/x.csv"
    assert redact_url("/local/path.jsonl") == "/local/path.jsonl"


# -- limit and empty ---------------------------------------------------------------------------


def test_limit_stops_reading_before_later_bad_lines() -> None:
    text = jsonl_text(ROWS) + "this is not json\n"
    dataset = read(put("memory://d/x.jsonl", text), limit=2)
    assert dataset.items() == ROWS[:2]
    assert read(put("memory://d/y.jsonl", jsonl_text(ROWS)), limit=10).items() == ROWS


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize(("limit", "chunk_rows"), [(7, 3), (6, 3), (1, 10), (100, 4)])
def test_limit_and_chunks_in_every_format(
    tmp_path: Path, fmt: str, limit: int, chunk_rows: int
) -> None:
    rows = [{"id": i, "text": f"row {i}"} for i in range(20)]
    path = write_all_formats(tmp_path, rows)[fmt]
    dataset = read_dataset(spec(id_field="id"), str(path), limit=limit, chunk_rows=chunk_rows)
    assert dataset.items() == rows[:limit]
    assert dataset.table.column("item_index").to_pylist() == list(range(min(limit, 20)))


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        read(put("memory://d/x.jsonl", jsonl_text(ROWS)), limit=0)


@pytest.mark.parametrize(
    ("name", "data"),
    [("x.jsonl", ""), ("x.jsonl", "\n  \n"), ("x.json", "[]"), ("x.csv", "a,b\n"), ("x.csv", "")],
)
def test_empty_dataset(name: str, data: str) -> None:
    url = put(f"memory://d/{name}", data)
    assert error(url) == f"{url}: the dataset has no items"


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), path)
    assert error(path) == f"{path}: the dataset has no items"


# -- slices, fields, missing fields ------------------------------------------------------------


def test_items_and_ids_follow_python_slices() -> None:
    rows = [{"i": i} for i in range(10)]
    dataset = read(put("memory://d/x.jsonl", jsonl_text(rows)), id_field="i")
    assert dataset.items(3, 5) == rows[3:5]
    assert dataset.items(8) == rows[8:]
    assert dataset.items(-2) == rows[-2:]
    assert dataset.items(5, 3) == []
    assert dataset.ids(2, 4) == ["2", "3"]
    assert dataset.ids(9, 100) == ["9"]


def test_fields_is_the_union_of_top_level_names() -> None:
    rows = [{"a": 1}, {"b": {"nested": 1}}, {"a": 2, "c": None}]
    assert read(put("memory://d/x.jsonl", jsonl_text(rows))).fields == {"a", "b", "c"}


def test_missing_field_finds_the_first_item_without_it() -> None:
    rows = [
        {"id": "r0", "target": "x"},
        {"id": "r1", "target": "", "other": '{"target": 1}'},  # key text inside a string
        {"id": "r2", "nested": {"target": 1}},  # nested key only: missing at top level
        {"id": "r3", "target": None},
        {"id": "r4"},
    ]
    dataset = read(put("memory://d/x.jsonl", jsonl_text(rows)), id_field="id")
    assert dataset.missing_field("target") == ("r2", 2)
    assert dataset.missing_field("id") is None
    assert dataset.missing_field("absent") == ("r0", 0)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"t": 1}, {"t": None}, {}], 1),  # flat null
        ([{"t": 1}, {"u": 1}], 1),  # flat absent
        ([{"t": {"t": None}}, {"t": 1, "x": [{"t": 2}]}], None),  # nested, present
        ([{"x": {"t": 1}, "t": None}, {"t": 1}], 0),  # nested key, top-level null
        ([{"t": 1, "x": {"t": 1}}, {"x": {"t": 1}}], 1),  # nested key only
        ([{'t"t': 1}, {"t": 1}], 0),  # a key ending in the field name is another key
        ([{"a": "{", "t": 0}, {"t": False}], None),  # brace in a string; falsy is not missing
    ],
)
def test_missing_field_cases(rows: list[dict[str, Any]], expected: int | None) -> None:
    dataset = read(put("memory://d/x.jsonl", jsonl_text(rows)))
    result = dataset.missing_field("t")
    assert (result[1] if result else None) == expected
    brute = next((i for i, row in enumerate(rows) if row.get("t") is None), None)
    assert expected == brute


# -- fingerprint and canonical form --------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_one_row() -> None:
    rows = [{"q": f"question {i}", "a": i} for i in range(100)]
    first = read(put("memory://d/a.jsonl", jsonl_text(rows)))
    again = read(put("memory://d/b.jsonl", jsonl_text(rows)))
    rows[57]["a"] = "changed"
    changed = read(put("memory://d/c.jsonl", jsonl_text(rows)))

    assert first.fingerprint == again.fingerprint
    assert changed.fingerprint != first.fingerprint
    assert len(first.fingerprint) == 32
    assert int(first.fingerprint, 16) >= 0


def test_fingerprint_depends_on_ids_and_order() -> None:
    rows = [{"id": "a", "q": 1}, {"id": "b", "q": 2}]
    url = put("memory://d/x.jsonl", jsonl_text(rows))
    by_content, by_id = read(url), read(url, id_field="id")
    reordered = read(put("memory://d/y.jsonl", jsonl_text(rows[::-1])), id_field="id")
    assert len({by_content.fingerprint, by_id.fingerprint, reordered.fingerprint}) == 3


def test_fast_row_encoder_equals_canonical_json() -> None:
    row = {
        "z": 1,
        "a": [1.5, 1e16, -0.0, math.inf, math.nan, True, None],
        "ü": 'ünï\n"q"\\ \u2028 \x00',
        "nested": {"b": {"a": 1}, "d": dt.date(2024, 1, 2), "dec": Decimal("1.10")},
        "bytes": b"\x00",
        "big": 2**80,
        "tuple": (1, 2),
    }
    assert _canonical_row(row) == canonical_json(row)
    assert _canonical_row({}) == canonical_json({})


# -- streaming ---------------------------------------------------------------------------------


def bytes_for_rows(rows: list[dict[str, Any]]) -> int:
    """What holding ``rows`` as parsed dicts costs, measured the way the streaming test is."""
    lines = [json.dumps(row) for row in rows]
    tracemalloc.start()
    parsed = [json.loads(line) for line in lines]
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del parsed
    return size


def test_large_jsonl_streams_with_bounded_memory(tmp_path: Path) -> None:
    n, chunk = 40_000, 2_000  # the same 1/20 ratio as a million rows in 50,000-row chunks
    path = tmp_path / "big.jsonl"

    def row(i: int) -> dict[str, Any]:
        return {"id": i, "question": f"What is {i} + {i}?", "answer": str(2 * i)}

    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row(i)) + "\n" for i in range(n))
    all_rows_bytes = bytes_for_rows([row(i) for i in range(2_000)]) * (n // 2_000)
    pa.array(["warm-up"])  # pyarrow's first conversion imports pandas: not ours to count

    tracemalloc.start()
    try:
        dataset = read_dataset(spec(id_field="id"), str(path), chunk_rows=chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Holding every row as a dict would take all_rows_bytes (~20 MB here). Streaming holds
    # one chunk of dicts (1/20 of the rows) plus its JSON texts and ids, and a 256 KiB read
    # block with its lines: about 1/8 of everything, half the bound. Arrow
    # buffers live outside tracemalloc's view, which is the point: they are compact.
    assert peak < all_rows_bytes / 4, (peak, all_rows_bytes)
    assert len(dataset) == n
    assert dataset.items(23_456, 23_459) == [row(i) for i in range(23_456, 23_459)]
    assert dataset.ids(n - 2) == [str(n - 2), str(n - 1)]
    assert dataset.missing_field("answer") is None
