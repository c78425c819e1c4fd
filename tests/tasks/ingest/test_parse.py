"""Damaged and oversized compressed prompt files (issue 18, item 8): each is one file problem
with its own reason, found while streaming in bounded memory, and quarantined by
``read_prompt_file`` with the records the policy keeps (docs/ingest.md, "Damaged files")."""

from __future__ import annotations

import gzip
import io
import json
import random
import tracemalloc
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftflow.tasks.adapters.s3 import ObjectInfo
from sftflow.tasks.ingest.parse import FileProblem, detect_format, parse_stream, read_prompt_file
from sftflow.tasks.ingest.prompts import FieldMapping, Limits, Prompt

MAP, LIM = FieldMapping(), Limits()


_R = random.Random(18)
VOCAB = ["".join(_R.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_R.randint(2, 9)))
         for _ in range(20_000)]


def words(i: int, n: int = 8) -> str:
    """Made-up words, varied enough that deflate writes many blocks (damage can then hit a
    block's codes, not only literals)."""
    return " ".join(VOCAB[(i * 7919 + k * 104_729 + k * k * i) % len(VOCAB)] for k in range(n))


def jsonl(n: int, size: int = 8) -> bytes:
    return b"".join(json.dumps({"prompt": f"damaged file prompt {i} {words(i, size)}"}).encode()
                    + b"\n" for i in range(n))


def csv_bytes(n: int) -> bytes:
    return ("prompt,lang\n" + "".join(f"csv damaged prompt {i} {words(i)},en\n"
                                      for i in range(n))).encode()


def json_array(n: int) -> bytes:
    return json.dumps([{"prompt": f"array damaged prompt {i} {words(i)}"} for i in range(n)]).encode()


def parquet_bytes(n: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": [f"parquet damaged prompt {i} {words(i, size)}"
                                        for i in range(n)]}), buf, compression="none")
    return buf.getvalue()


def flipped(data: bytes, kind: str) -> bytes:
    """``data`` gzipped with 4 bytes flipped past the middle of the stream, where the damage
    shows as ``kind``: "zlib" (an invalid deflate code) or "crc" (valid codes, wrong text:
    only the CRC at the end tells)."""
    gz = gzip.compress(data, mtime=0)
    for off in range(len(gz) // 2, len(gz) - 16):
        bad = bytearray(gz)
        bad[off:off + 4] = bytes(b ^ 0xFF for b in bad[off:off + 4])
        try:
            gzip.decompress(bytes(bad))
        except zlib.error:
            found = "zlib"
        except gzip.BadGzipFile:
            found = "crc"
        except EOFError:
            found = "eof"
        else:
            found = ""
        if found == kind:
            return bytes(bad)
    raise AssertionError(f"no {kind} damage found")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    gz = gzip.compress(data, mtime=0)
    return gz[: int(len(gz) * keep)]


def parse_all(data: bytes, name: str, limits: Limits = LIM) -> tuple[list[Prompt], FileProblem | None]:
    fmt, gz = detect_format(name)
    items: list = []
    try:
        items.extend(parse_stream(io.BytesIO(data), fmt, gz, MAP, limits))
    except FileProblem as problem:
        return items, problem
    return items, None


CORRUPT_CASES = [("x.jsonl.gz", jsonl(3000)), ("x.csv.gz", csv_bytes(3000)),
                 ("x.json.gz", json_array(3000)), ("x.parquet.gz", parquet_bytes(3000))]


@pytest.mark.parametrize("kind", ["zlib", "crc"])
@pytest.mark.parametrize(("name", "data"), CORRUPT_CASES, ids=[c[0] for c in CORRUPT_CASES])
def test_flipped_bytes_mid_stream_are_corrupt_compression(name, data, kind):
    _, problem = parse_all(flipped(data, kind), name)
    assert problem is not None, "damage not detected"
    assert problem.reason == "corrupt_compression", problem
    assert not problem.keeps_records  # the text before the error is not proven intact


@pytest.mark.parametrize(("name", "data"), [("x.jsonl.gz", jsonl(3000)), ("x.csv.gz", csv_bytes(3000)),
                                            ("x.json.gz", json_array(3000))],
                         ids=["jsonl", "csv", "json"])
def test_a_truncated_text_file_keeps_the_records_before_the_cut(name, data):
    cut = truncated(data)
    items, problem = parse_all(cut, name)
    assert problem is not None and problem.reason == "truncated_file", problem
    assert problem.keeps_records
    # What the cut stream holds, decompressed: every complete record of it but the last one
    # (which the cut may have shortened) is kept, in order, intact.
    whole = zlib.decompressobj(31).decompress(cut)
    assert 0 < len(whole) < len(data) and data.startswith(whole)
    prompts = [i.prompt for i in items]
    assert all(isinstance(i, Prompt) for i in items) and len(prompts) > 100
    assert [i.row for i in items] == list(range(1, len(items) + 1))
    assert all(p.encode() in whole for p in prompts)
    assert problem.row == len(items)  # where the kept records end: the quarantine's location
    assert f"up to row {len(items)} kept" in problem.detail


def test_a_truncated_jsonl_gz_loses_at_most_the_record_the_cut_went_through():
    data = jsonl(3000)
    cut = truncated(data, 0.7)
    whole = zlib.decompressobj(31).decompress(cut)
    complete = whole.count(b"\n")  # lines wholly inside the cut stream
    items, problem = parse_all(cut, "t.jsonl.gz")
    assert problem is not None and problem.reason == "truncated_file"
    assert complete - 1 <= len(items) <= complete


def test_a_truncated_parquet_gz_is_quarantined_whole():
    items, problem = parse_all(truncated(parquet_bytes(3000)), "t.parquet.gz")
    assert problem is not None and problem.reason == "truncated_file", problem
    assert items == []


def test_a_parquet_gz_over_the_decompressed_limit_is_too_large_unread():
    data = gzip.compress(parquet_bytes(3000))
    limit = len(data) + 1000  # the object is within the limit, its content is not
    assert len(parquet_bytes(3000)) > 2 * limit
    items, problem = parse_all(data, "big.parquet.gz", Limits(max_file_bytes=limit))
    assert problem is not None and problem.reason == "too_large" and items == []


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_damage_is_found_in_bounded_memory():
    # ~12 MB once decompressed, in records of ~800 bytes: what is measured is the memory a
    # file's size could make grow, and fewer records cost tracemalloc (which hooks every
    # allocation) a quarter of the time of 60,000 records of 200 bytes.
    big = jsonl(15_000, size=120)
    assert len(big) > 10 * 2**20
    cut = truncated(big, 0.9)

    def count(data: bytes, name: str) -> None:
        fmt, gz = detect_format(name)
        with pytest.raises(FileProblem) as err:
            for _ in parse_stream(io.BytesIO(data), fmt, gz, MAP, LIM):
                pass
        assert err.value.reason in ("truncated_file", "corrupt_compression")

    assert _peak(lambda: count(cut, "big.jsonl.gz")) < 6 * 2**20
    bad = flipped(big, "crc")
    assert _peak(lambda: count(bad, "big.jsonl.gz")) < 6 * 2**20
    # Parquet needs random access: spooled to a temporary file, not held in memory.
    pq_big = parquet_bytes(15_000, size=120)  # ~12 MB
    assert len(pq_big) > 10 * 2**20
    cut_pq = truncated(pq_big, 0.9)
    assert _peak(lambda: count(cut_pq, "big.parquet.gz")) < 10 * 2**20


def test_json_lines_under_a_json_name_are_streamed_in_bounded_memory():
    big = jsonl(15_000, size=120)  # ~12 MB, as above
    assert len(big) > 10 * 2**20
    peak = _peak(lambda: sum(1 for _ in parse_stream(io.BytesIO(big), "json", False, MAP, LIM)))
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MB for {len(big) / 2**20:.0f} MB of JSON lines"


# -- read_prompt_file: the quarantine record, against SeaweedFS ------------------------------
def _read(s3, key: str, data: bytes):
    s3.put_bytes(key, data)
    (obj,) = [o for o in s3.list(key) if o.key == key]
    parsed = read_prompt_file(s3, s3.bucket, obj, MAP, LIM, "_sftflow")
    return obj, parsed


def _reason(s3, obj: ObjectInfo) -> dict:
    (key,) = [o.key for o in s3.list(f"_sftflow/quarantine/files/{obj.key}@")
              if o.key.endswith(".reason.json")]
    return json.loads(s3.get_bytes(key)[0])


@pytest.mark.integration
def test_read_prompt_file_quarantines_corrupt_compression_whole(s3):
    obj, parsed = _read(s3, "in/flipped.jsonl.gz", flipped(jsonl(3000), "zlib"))
    assert parsed.problem is not None and parsed.problem.reason == "corrupt_compression"
    assert parsed.prompts == [] and parsed.rejected == []  # none of its records is trusted
    reason = _reason(s3, obj)
    assert reason["reason"] == "corrupt_compression" and reason["copy"]
    assert reason["records_kept"] == 0 and reason["records_before_problem"] > 0


@pytest.mark.integration
def test_read_prompt_file_keeps_a_truncated_files_prefix_and_names_where_it_ends(s3):
    obj, parsed = _read(s3, "in/cut.jsonl.gz", truncated(jsonl(3000)))
    assert parsed.problem is not None and parsed.problem.reason == "truncated_file"
    kept = len(parsed.prompts)
    assert kept > 100 and [p.row for p in parsed.prompts] == list(range(1, kept + 1))
    reason = _reason(s3, obj)
    assert reason["reason"] == "truncated_file" and reason["records_kept"] == kept
    assert reason["after_row"] == kept and reason["copy"]


@pytest.mark.integration
def test_read_prompt_file_quarantines_a_truncated_parquet_gz(s3):
    obj, parsed = _read(s3, "in/cut.parquet.gz", truncated(parquet_bytes(3000)))
    assert parsed.problem is not None and parsed.problem.reason == "truncated_file"
    assert parsed.prompts == []
    assert _reason(s3, obj)["reason"] == "truncated_file"
