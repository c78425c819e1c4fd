"""Prompt files: parsing every format, rejecting bad records with reasons, prompt ids, ledger."""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftflow.tasks.adapters.s3 import ObjectInfo
from sftflow.tasks.ingest.ledger import Ledger, _key_hash
from sftflow.tasks.ingest.parse import (
    FileProblem,
    array_elements,
    detect_format,
    nesting_depth,
    parse_stream,
)
from sftflow.tasks.ingest.prompts import (
    FieldMapping,
    Limits,
    Prompt,
    Rejected,
    normalise,
    prompt_id,
)

MAP = FieldMapping()
LIM = Limits()


def parse(data: bytes, name: str, mapping: FieldMapping = MAP, limits: Limits = LIM):
    fmt, gz = detect_format(name)
    items = list(parse_stream(io.BytesIO(data), fmt, gz, mapping, limits))
    return [i for i in items if isinstance(i, Prompt)], [i for i in items if isinstance(i, Rejected)]


def test_prompt_id_is_stable_under_case_width_and_whitespace():
    a = prompt_id("What is  the capital\tof France?")
    assert a == prompt_id("  what is the CAPITAL of france? \n")
    assert a == prompt_id("What is the capital of Ｆｒａｎｃｅ?")  # NFKC: full-width letters
    assert a != prompt_id("What is the capital of Spain?")
    assert len(a) == 32 and int(a, 16) >= 0
    assert normalise("Straße\u00a0 X") == "strasse x"


def test_prompt_ids_and_ledger_key_hashes_are_pinned():
    # Every task in every project carries these ids: they must never change.
    assert prompt_id("What is the capital of France?") == "c990cc06e5e77570e5f03360426d2b7f"
    assert prompt_id("lone \ud800 surrogate") == "479215214424b9467f3e8c1702144dd9"
    assert _key_hash("in/a.jsonl") == "4d26fca73b5bea4b87f6cc4fdaa75e91"


def test_jsonl_plain_and_gzip_give_the_same_prompts_with_rows():
    lines = [json.dumps({"prompt": f"p{i}", "template": "t"}) for i in range(5)]
    raw = ("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n").encode()
    plain, rej = parse(raw, "a/x.jsonl")
    zipped, _ = parse(gzip.compress(raw), "a/x.jsonl.gz")
    assert rej == [] and [p.prompt for p in plain] == [f"p{i}" for i in range(5)]
    assert [p.row for p in plain] == [1, 2, 4, 5, 6]  # line numbers; the blank line is no record
    assert plain == zipped


def test_gzip_is_detected_by_magic_bytes_whatever_the_name():
    data = gzip.compress(b'{"prompt": "hello"}\n')
    prompts, _ = parse(data, "x.jsonl")
    assert [p.prompt for p in prompts] == ["hello"]


def test_every_record_level_problem_has_its_reason():
    lines = [
        b'{"prompt": "fine"}',
        b'{"prompt": "bad \xff\xfe bytes"}',
        b"{not json",
        b'["a", "list"]',
        b'{"other": "x"}',
        b'{"prompt": null}',
        b'{"prompt": 42}',
        b'{"prompt": "   "}',
        b'{"prompt": "' + b"x" * 50 + b'"}',
        b'{"prompt": "lone \\ud800 surrogate"}',
    ]
    prompts, rejected = parse(b"\n".join(lines), "r.jsonl", limits=Limits(max_prompt_chars=40))
    assert [p.prompt for p in prompts] == ["fine"]
    assert [(r.row, r.reason) for r in rejected] == [
        (2, "invalid_utf8"), (3, "invalid_json"), (4, "not_object"), (5, "missing_prompt"),
        (6, "missing_prompt"), (7, "wrong_type"), (8, "empty_prompt"), (9, "too_large"),
        (10, "invalid_utf8"),
    ]
    assert rejected[2].raw == '["a", "list"]'  # the raw record travels to the quarantine


def test_json_array_and_alpaca_style_instruction_plus_input():
    rows = [
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
        {"instruction": "Name a colour", "input": "", "output": "red"},
        {"instruction": "Sum", "input": 3},
    ]
    mapping = FieldMapping(prompt_field="instruction", input_field="input", keep_fields=["output"])
    prompts, rejected = parse(json.dumps(rows).encode(), "alpaca.json", mapping)
    assert [p.prompt for p in prompts] == ["Translate to French\n\ngood morning", "Name a colour"]
    assert prompts[0].extra == {"output": "bonjour"} and prompts[1].row == 2
    assert [(r.row, r.reason) for r in rejected] == [(3, "wrong_type")]


def test_json_file_holding_json_lines_is_read_as_lines():
    prompts, _ = parse(b'{"prompt": "a"}\n{"prompt": "b"}\n', "x.json")
    assert [p.prompt for p in prompts] == ["a", "b"]


def test_csv_and_tsv_with_bad_bytes_in_one_row():
    csv_data = b'prompt,lang\n"Hello, world",en\nbad \xff row,xx\n"multi\nline",en\n'
    prompts, rejected = parse(csv_data, "p.csv")
    assert [p.prompt for p in prompts] == ["Hello, world", "multi\nline"]
    assert [(r.row, r.reason) for r in rejected] == [(2, "invalid_utf8")]
    prompts, _ = parse(b"prompt\tx\nfirst\t1\n", "p.tsv")
    assert [p.prompt for p in prompts] == ["first"]


def test_parquet_plain_and_gzip():
    table = pa.table({"prompt": ["a", None, "c"], "n": [1, 2, 3]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    for name, data in (("t.parquet", buf.getvalue()), ("t.parquet.gz", gzip.compress(buf.getvalue()))):
        prompts, rejected = parse(data, name)
        assert [(p.prompt, p.row) for p in prompts] == [("a", 1), ("c", 3)]
        assert [(r.row, r.reason) for r in rejected] == [(2, "missing_prompt")]


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"\x00\x01\x02binary", "x.jsonl", "binary"),
        (b"PAR1....", "x.csv", "binary"),
        (b"[1, 2", "x.json", "unparseable"),
        (b"[1, 2]", "x.json.gz", "unparseable"),  # named .gz, not gzip
        # mtime=0: the same bytes, so the same test id, in every xdist worker
        (gzip.compress(b'{"prompt": "a"}\n' * 1000, mtime=0)[:-30], "x.jsonl.gz", "truncated_file"),
        (b'{"prompt": "\xff"}', "x.json", "invalid_utf8"),
        (b"not parquet at all", "x.parquet", "unparseable"),
    ],
)
def test_file_level_problems(data, name, reason):
    with pytest.raises(FileProblem) as err:
        parse(data, name)
    assert err.value.reason == reason


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_records_are_quarantined_not_raised():
    jsonl = b'{"prompt": "before"}\n{"prompt": "deep", "x": ' + DEEP.encode() + b'}\n{"prompt": "after"}\n'
    prompts, rejected = parse(jsonl, "d.jsonl")
    assert [p.prompt for p in prompts] == ["before", "after"]
    assert [(r.row, r.reason) for r in rejected] == [(2, "too_deep")]
    array = ('[{"prompt": "before"}, ' + DEEP + ', {"prompt": "after"}]').encode()
    prompts, rejected = parse(array, "d.json")
    assert [p.prompt for p in prompts] == ["before", "after"]
    assert [(r.row, r.reason) for r in rejected] == [(2, "too_deep")]


def test_nesting_past_the_limit_is_quarantined_and_brackets_in_strings_do_not_count():
    def nested(depth: int) -> str:
        return json.dumps({"prompt": f"p{depth}", "x": None}).replace(
            "null", "[" * (depth - 1) + "]" * (depth - 1))

    jsonl = "\n".join([nested(100), nested(101), nested(300),
                       json.dumps({"prompt": "[" * 5000 + "{" * 5000})]).encode()
    prompts, rejected = parse(jsonl, "n.jsonl")
    assert [p.prompt for p in prompts] == ["p100", "[" * 5000 + "{" * 5000]
    assert [(r.row, r.reason, r.detail) for r in rejected] == [
        (2, "too_deep", "nested deeper than 100 levels"), (3, "too_deep", "nested deeper than 100 levels")]
    prompts, rejected = parse(jsonl, "n.jsonl", limits=Limits(max_depth=300))
    assert [p.prompt for p in prompts] == ["p100", "p101", "p300", "[" * 5000 + "{" * 5000]
    assert nesting_depth('{"a": "' + "[" * 50 + '"}', 10) == 1  # brackets in a string
    assert nesting_depth('{"a": "[[[[", "b": [[{"c": "\\"]]"}]]}', 3) == 4  # an escaped quote


def test_control_characters_are_quarantined_tab_newline_cr_are_text():
    lines = [{"prompt": "nul \u0000 here"}, {"prompt": "bell \u0007"}, {"prompt": "tab\tnl\ncr\r ok"},
             {"prompt": "fine", "note": "esc \u001b"}]
    data = "\n".join(json.dumps(r) for r in lines).encode()
    prompts, rejected = parse(data, "c.jsonl", FieldMapping(keep_fields=["note"]))
    assert [p.prompt for p in prompts] == ["tab\tnl\ncr\r ok"]
    assert [(r.row, r.reason, r.detail) for r in rejected] == [
        (1, "control_chars", "prompt: U+0000 at char 4"), (2, "control_chars", "prompt: U+0007 at char 5"),
        (4, "control_chars", "note: U+001B at char 4")]


def test_a_utf8_bom_loses_no_record():
    bom = b"\xef\xbb\xbf"
    prompts, rejected = parse(bom + b"prompt,lang\nfirst,en\nsecond,fr\n", "b.csv")
    assert ([p.prompt for p in prompts], rejected) == (["first", "second"], [])
    prompts, rejected = parse(bom + b'{"prompt": "one"}\n{"prompt": "two"}\n', "b.jsonl")
    assert ([p.prompt for p in prompts], rejected) == (["one", "two"], [])
    prompts, _ = parse(gzip.compress(bom + b'[{"prompt": "arr"}]'), "b.json.gz")
    assert [p.prompt for p in prompts] == ["arr"]


def test_a_csv_field_longer_than_the_csv_default_limit_is_one_record():
    long = "x" * 200_000  # csv's default field_size_limit is 131,072
    data = f"prompt,lang\nshort,en\n{long},en\nlast,en\n".encode()
    prompts, rejected = parse(data, "l.csv")
    assert [p.prompt for p in prompts] == ["short", "last"]
    assert [(r.row, r.reason) for r in rejected] == [(2, "too_large")]


def test_the_size_limit_holds_for_decompressed_bytes():
    records = [{"prompt": f"inflated prompt {i} " + "a" * 200} for i in range(20_000)]
    bomb = gzip.compress(json.dumps(records).encode())  # ~4.5 MB of text
    assert len(bomb) < 200_000
    items = []
    with pytest.raises(FileProblem) as err:
        items.extend(parse_stream(io.BytesIO(bomb), "json", True, MAP, Limits(max_file_bytes=2**20)))
    assert err.value.reason == "too_large" and "decompressed" in err.value.detail
    assert 4000 < len(items) < 5000 and all(isinstance(i, Prompt) for i in items)  # before the cut


def test_json_arrays_are_streamed_in_bounded_memory():
    # ~13 MB in 25,000 elements of ~520 bytes (fewer allocations for tracemalloc to hook than
    # 100,000 of 130 bytes: a quarter of the time, the same file size against the same bound)
    data = json.dumps([{"prompt": f"streamed prompt {i} " + "b" * 490, "n": i}
                       for i in range(25_000)]).encode()
    stream = io.BytesIO(data)
    tracemalloc.start()
    try:
        count = sum(1 for _ in parse_stream(stream, "json", False, MAP, LIM))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 25_000 and len(data) > 12 * 2**20
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MB while parsing a {len(data) / 2**20:.0f} MB array"


def test_array_elements_split_across_chunks_with_strings_escapes_and_nesting():
    text = '  [ {"a": "x,]}\\"\\\\", "b": [1, {"c": 2}]} , 3,"s\\u0022" ,[] ]  '
    for size in (1, 2, 3, 7, len(text)):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        assert [json.loads(t) for t in array_elements(chunks)] == [
            {"a": 'x,]}"\\', "b": [1, {"c": 2}]}, 3, 's"', []]
    assert list(array_elements(["[]"])) == []
    for bad in ("[1, 2", "{}", "[1] 2"):
        with pytest.raises(FileProblem, match="unparseable"):
            list(array_elements([bad]))


def test_unsupported_extension():
    with pytest.raises(FileProblem, match="unsupported_type"):
        detect_format("notes/readme.md")
    assert detect_format("a/b.NDJSON.GZ") == ("jsonl", True)


def test_mapping_validation():
    with pytest.raises(ValueError, match="join_template"):
        FieldMapping(join_template="{prompt} only")
    with pytest.raises(ValueError, match="keep_fields"):
        FieldMapping(keep_fields=["prompt_id"])


@pytest.mark.integration
def test_ledger_roundtrip_pending_snapshot_and_reset(s3):
    ledger = Ledger(s3, s3.bucket, "_sftflow", 7)
    state = ledger.load("2026-01-01")
    assert not state.found and state.ids == set() and state.expected_tasks == 0
    ledger.mark_pending("b1", 2)
    ledger.confirm("b0", ["a", "b"], 2)
    ledger.confirm("b0", ["a", "b"], 2)  # a retried confirm changes nothing
    state = ledger.load("2026-01-01")
    assert state.found and state.ids == {"a", "b"} and state.expected_tasks == 2
    assert state.pending == ["b1"]
    ledger.confirm("b1", ["x"], 1)
    ledger.write_snapshot({"a", "b", "x", "z"}, 5, ledger.load("2026-01-01").segment_keys)
    state = ledger.load("2026-01-01")
    assert (state.ids, state.expected_tasks, state.pending) == ({"a", "b", "x", "z"}, 5, [])

    obj = ObjectInfo("in/a.jsonl", '"etag1"', 10)
    ledger.mark_object(obj, {"records": 3})
    done = ledger.processed_objects()
    assert Ledger.is_processed(done, obj)
    assert not Ledger.is_processed(done, ObjectInfo("in/a.jsonl", '"etag2"', 10))  # changed

    # Same project id, another project instance (e.g. Label Studio was reset): start over.
    state = ledger.load("2027-02-02")
    assert not state.found and state.ids == set()
    assert ledger.processed_objects() == {}
