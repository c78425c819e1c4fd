"""Prompt files: formats and the streaming parse of one source object into prompts.

``detect_format`` reads the format from the key (``.jsonl``, ``.ndjson``, ``.json``, ``.csv``,
``.tsv``, ``.parquet``, ``.pq``, each optionally ``.gz``); ``parse_stream`` streams the records
of one file (gunzipped whatever the name says, capped at ``Limits.max_file_bytes`` once
decompressed), each a ``Prompt`` or a ``Rejected`` record; a problem of the whole file raises
``FileProblem``. Damaged gzip data is one too, found while streaming: ``truncated_file`` (the
stream ends before its end marker: what came before is intact and kept) or
``corrupt_compression`` (bad deflate data or CRC: nothing of the file is kept). Memory holds a
buffer and one record, whatever the file's size; a gzipped Parquet file is spooled to a
temporary file. ``read_prompt_file`` reads one S3 object that way and quarantines what cannot
be used (``ledger.quarantine_records`` / ``ledger.quarantine_file``); ``read_prompt_file_task``
is its Prefect task.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from sftflow.tasks.adapters.s3 import S3, ObjectInfo
from sftflow.tasks.ingest.ledger import quarantine_file, quarantine_records
from sftflow.tasks.ingest.prompts import (
    FieldMapping,
    Limits,
    Prompt,
    Rejected,
    raw_preview,
    to_prompt,
)
from sftflow.tasks.runtime.declare import io_task

Format = Literal["jsonl", "json", "csv", "tsv", "parquet"]
_EXT: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class FileProblem(Exception):
    """The whole file cannot be read; ``reason`` is a short machine-readable code.

    Records yielded before the problem are kept (and the rest of the file quarantined), unless
    ``keeps_records`` is False: then none of the file's records can be trusted. ``row`` is the
    row of the last record kept (None: none), set by ``parse_stream``."""

    def __init__(self, reason: str, detail: str = "", *, keeps_records: bool = True):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.keeps_records = reason, detail, keeps_records
        self.row: int | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def detect_format(key: str) -> tuple[Format, bool]:
    """``("jsonl", True)`` for ``x.jsonl.gz``. Unknown extensions raise FileProblem."""
    name = key.rsplit("/", 1)[-1].lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for ext, fmt in _EXT.items():
        if name.endswith(ext):
            return fmt, gz
    raise FileProblem("unsupported_type", f"no reader for {key.rsplit('/', 1)[-1]!r}")


def _sniff(stream: BinaryIO, n: int = 8192) -> tuple[bytes, BinaryIO]:
    """Peek at the first bytes without losing them."""
    head = stream.read(n)
    return head, _Prefixed(head, stream)


class _Prefixed(io.RawIOBase):
    """A read-only stream: ``head`` then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head, self._stream = memoryview(head), stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Capped(io.RawIOBase):
    """A read-only stream that ends after ``limit`` bytes; ``exceeded`` says whether there was
    more. The size limit holds for decompressed bytes too (a 155 KB gzip can inflate to 45 MB)."""

    def __init__(self, stream: BinaryIO, limit: int):
        self._stream, self._room, self.exceeded = stream, limit, False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._room <= 0:
            self.exceeded = self.exceeded or bool(self._stream.read(1))
            return 0
        data = self._stream.read(min(len(b), self._room))
        self._room -= len(data)
        b[: len(data)] = data
        return len(data)


class _Gunzip(io.RawIOBase):
    """Gzip data, decompressed as it is read. Damage ends the stream (reads give b"") and is
    kept in ``problem``, so the readers above lose nothing already decompressed:

    - ``truncated_file``: the data ends before gzip's end marker (an object cut short); what
      was decompressed before is exactly what was compressed, and is kept;
    - ``corrupt_compression``: invalid deflate data, or a CRC or length that does not match.
      Deflate finds bad data late (a flipped byte inside a block often decodes to other text;
      only the CRC at the end tells), so nothing decompressed from it is trusted.

    Errors of the underlying stream (S3, network) pass unchanged: they may heal."""

    def __init__(self, stream: BinaryIO):
        self._gz = gzip.GzipFile(fileobj=io.BufferedReader(stream, 1 << 20))  # type: ignore[arg-type]
        self.out = 0  # decompressed bytes delivered
        self.problem: FileProblem | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.problem is not None:
            return 0
        try:
            data = self._gz.read1(len(b))
        except EOFError:
            self.problem = FileProblem(
                "truncated_file",
                f"gzip data ends before its end marker, after {self.out} decompressed bytes")
            return 0
        except (gzip.BadGzipFile, zlib.error) as err:
            self.problem = FileProblem(
                "corrupt_compression", f"{err} (after {self.out} decompressed bytes)",
                keeps_records=False)
            return 0
        b[: len(data)] = data
        self.out += len(data)
        return len(data)


def _decompressed(stream: BinaryIO, gz: bool, limit: int) -> tuple[_Capped, _Gunzip | None]:
    """The object's bytes, gunzipped when they are gzip data, at most ``limit`` of them; and
    the gzip reader (its ``problem``), if any."""
    head, stream = _sniff(stream, 2)
    gunzip = None
    if head[:2] == b"\x1f\x8b":  # gzip magic, whatever the name says
        stream = gunzip = _Gunzip(stream)  # type: ignore[assignment]
    elif gz:
        raise FileProblem("unparseable", "named .gz but not gzip data")
    return _Capped(stream, limit), gunzip


def _check_text(head: bytes) -> None:
    if b"\x00" in head:
        raise FileProblem("binary", "NUL bytes in a text format")
    if head.startswith(b"PAR1"):
        raise FileProblem("binary", "Parquet data under a text extension")


def _iter_jsonl(stream: BinaryIO, mapping: FieldMapping, limits: Limits) -> Iterator[Prompt | Rejected]:
    for row, line in enumerate(stream, 1):
        line = line.strip()
        if not line:
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Rejected(row, "invalid_utf8", str(err), raw_preview(line))
            continue
        record = _loads(text, row, limits.max_depth)
        yield record if isinstance(record, Rejected) else to_prompt(record, row, mapping, limits,
                                                                     raw=text)


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # a string (skipped whole) or a bracket


def nesting_depth(text: str, limit: int) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, counted without recursion
    (brackets inside strings do not count); it stops counting past ``limit``. A text with no
    more than ``limit`` opening brackets is not scanned."""
    if text.count("[") + text.count("{") <= limit:
        return 0
    depth = deepest = 0
    for m in _TOKEN.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif ch in "]}":
            depth -= 1
    return deepest


def _loads(text: str, row: int, max_depth: int) -> Any:
    """One JSON record, or why it cannot be read. Nesting past ``max_depth`` is refused before
    ``json.loads``, whose parser recurses: a RecursionError caught at the interpreter's limit
    is not enough, since whatever else runs at that depth (a finaliser the garbage collector
    calls there) fails too."""
    if nesting_depth(text, max_depth) > max_depth:
        return Rejected(row, "too_deep", f"nested deeper than {max_depth} levels", text[:500])
    try:
        return json.loads(text)
    except ValueError as err:
        return Rejected(row, "invalid_json", str(err), text[:500])
    except RecursionError:  # a max_depth near the interpreter's own limit
        return Rejected(row, "too_deep", "nested too deeply to parse", text[:500])


def _iter_json(stream: BinaryIO, mapping: FieldMapping, limits: Limits) -> Iterator[Prompt | Rejected]:
    head, stream = _sniff(stream)
    if not head.lstrip().startswith(b"["):  # one object, or JSON lines under a .json name
        for item in _iter_jsonl(io.BufferedReader(stream, 1 << 16), mapping, limits):  # type: ignore[arg-type]
            if isinstance(item, Rejected) and item.reason == "invalid_utf8":  # a document's
                raise FileProblem("invalid_utf8", f"line {item.row}: {item.detail}")
            yield item
        return
    decoder = codecs.getincrementaldecoder("utf-8")()

    def chunks() -> Iterator[str]:
        try:
            while block := stream.read(1 << 16):
                yield decoder.decode(block)
            yield decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise FileProblem("invalid_utf8", str(err)) from err

    for row, text in enumerate(array_elements(chunks()), 1):
        record = _loads(text, row, limits.max_depth)
        yield record if isinstance(record, Rejected) else to_prompt(record, row, mapping, limits)


_STRUCTURE = re.compile(r'["\[\]{},]')
_IN_STRING = re.compile(r'["\\]')


def array_elements(chunks: Iterable[str]) -> Iterator[str]:
    """The JSON text of each element of one top-level JSON array, read chunk by chunk: memory
    holds one element and one chunk, whatever the file's size, and nesting depth is a counter
    (no recursion). Elements are not validated (``json.loads`` does that, one by one); a file
    that is not one whole array raises FileProblem ``unparseable``."""
    buf, pos, depth, in_string = "", 0, 0, False
    start: int | None = None  # where the current element's text begins in buf
    ended = False
    for chunk in chunks:
        keep = pos if start is None else start  # drop what was consumed
        buf, pos = buf[keep:] + chunk, pos - keep
        start = None if start is None else 0
        while pos < len(buf):
            if ended:
                if buf[pos:].strip():
                    raise FileProblem("unparseable", "JSON array: data after the closing ]")
                pos = len(buf)
                break
            if depth == 0:
                rest = buf[pos:].lstrip()
                if not rest:
                    pos = len(buf)
                    break
                if rest[0] != "[":
                    raise FileProblem("unparseable", "JSON array: does not start with [")
                pos, depth, start = len(buf) - len(rest) + 1, 1, len(buf) - len(rest) + 1
                continue
            m = (_IN_STRING if in_string else _STRUCTURE).search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            ch, pos = m.group(), m.end()
            if in_string:
                if ch == "\\":
                    pos += 1  # the escaped character (it may be in the next chunk)
                else:
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
            elif ch in "]}" and depth > 1:
                depth -= 1
            elif ch == "," and depth > 1:
                continue
            else:  # "," or the closing "]" of the array itself
                assert start is not None
                text = buf[start:pos - 1].strip()
                if text or ch == ",":
                    yield text
                if ch == "]":
                    depth, ended, start = 0, True, None
                else:
                    start = pos
    if not ended:
        raise FileProblem("unparseable", "JSON array: premature end of data")


def _iter_csv(
    stream: BinaryIO, mapping: FieldMapping, limits: Limits, delimiter: str
) -> Iterator[Prompt | Rejected]:
    # A field may be as long as the file (the prompt's length is checked per record).
    csv.field_size_limit(max(csv.field_size_limit(), limits.max_file_bytes))
    # surrogateescape keeps bad bytes visible per row instead of failing the whole file
    reader_stream = codecs.getreader("utf-8")(stream, errors="surrogateescape")
    reader = csv.DictReader(reader_stream, delimiter=delimiter)
    try:
        for row, record in enumerate(reader, 1):
            if None in record:  # more cells than header columns
                record.pop(None)
            yield to_prompt(record, row, mapping, limits)
    except csv.Error as err:
        raise FileProblem("unparseable", f"CSV: {err}") from err


def _iter_parquet(
    source: Any, mapping: FieldMapping, limits: Limits, local: bool = False
) -> Iterator[Prompt | Rejected]:
    """Records by row group. Bad Parquet data is ``unparseable`` (the records of the row groups
    before it are kept); an ``OSError`` is too when ``source`` is a local spool (else it may be
    the network, and heal)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad: tuple[type[Exception], ...] = (pa.ArrowInvalid, pa.ArrowNotImplementedError,
                                        *((OSError,) if local else ()))
    try:
        pf = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as err:
        raise FileProblem("unparseable", f"Parquet: {err}") from err
    names = set(pf.schema_arrow.names)
    wanted = [mapping.prompt_field, mapping.input_field, *mapping.keep_fields]
    columns = [c for c in dict.fromkeys(wanted) if c and c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield to_prompt(record, row, mapping, limits)
    except bad as err:
        raise FileProblem("unparseable", f"Parquet, after row {row}: {err}") from err


SPOOL_IN_MEMORY = 4 * 2**20  # a gunzipped Parquet file larger than this is spooled to disk


def parse_stream(
    stream: BinaryIO, fmt: Format, gz: bool, mapping: FieldMapping, limits: Limits
) -> Iterator[Prompt | Rejected]:
    """Records of one file, streamed. Raises FileProblem for problems of the whole file, with
    ``row`` set to the row of the last record yielded (the rest is quarantined).

    At most ``limits.max_file_bytes`` are read (after decompression): past that, FileProblem
    ``too_large`` is raised, the records before the cut having been yielded (except the last
    one read, which the cut may have truncated). Damaged gzip data ends the same way, as
    ``truncated_file`` or ``corrupt_compression`` (whose ``keeps_records`` is False: the
    records yielded are not to be used). Parquet needs random access: pass a seekable stream
    (gzipped Parquet is spooled to a temporary file first, within the size limit).
    """
    last_row: int | None = None
    try:
        items = (_parquet_records(stream, gz, mapping, limits) if fmt == "parquet"
                 else _text_records(stream, fmt, gz, mapping, limits))
        for item in items:
            last_row = item.row
            yield item
    except FileProblem as problem:
        problem.row = last_row if problem.keeps_records else None
        if problem.row is not None:
            problem.detail += f"; records up to row {problem.row} kept, the rest quarantined"
        raise


def _parquet_records(stream: BinaryIO, gz: bool, mapping: FieldMapping,
                     limits: Limits) -> Iterator[Prompt | Rejected]:
    if not gz and stream.seekable():
        head = stream.read(2)
        stream.seek(0)
        gz = head == b"\x1f\x8b"  # gzip data under a .parquet name
    if not gz and stream.seekable():
        yield from _iter_parquet(stream, mapping, limits)
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        capped, gunzip = _decompressed(stream, gz, limits.max_file_bytes)
        shutil.copyfileobj(capped, spool, 1 << 20)
        if gunzip is not None and gunzip.problem is not None:
            raise gunzip.problem  # nothing read yet: a damaged Parquet file is kept whole
        if capped.exceeded:
            raise _too_large(limits)
        spool.seek(0)
        yield from _iter_parquet(spool, mapping, limits, local=True)


def _text_records(stream: BinaryIO, fmt: Format, gz: bool, mapping: FieldMapping,
                  limits: Limits) -> Iterator[Prompt | Rejected]:
    """The records of a text format; the last one read is held back until the next one comes,
    as the size limit or damaged gzip data may have cut it."""
    capped, gunzip = _decompressed(stream, gz, limits.max_file_bytes)
    held: Prompt | Rejected | None = None
    try:
        for item in _iter_text(io.BufferedReader(capped, 1 << 20), fmt, mapping, limits):  # type: ignore[arg-type]
            if held is not None:
                yield held
            held = item
    except FileProblem:
        if not capped.exceeded:  # (past the limit, the cut is the reason: below)
            _drain(capped, gunzip)
            raise
    if gunzip is not None and gunzip.problem is not None:
        raise gunzip.problem
    if capped.exceeded:
        raise _too_large(limits)
    if held is not None:
        yield held


def _drain(capped: _Capped, gunzip: _Gunzip | None) -> None:
    """After a reader's complaint about gzipped data: read on (within the size limit, a block
    at a time, discarding) and raise the damage of the gzip data if there is any, which is
    then the reason (corrupt data often reads as a broken record or structure first)."""
    if gunzip is None:
        return
    block = bytearray(1 << 16)
    while capped.readinto(block):
        pass
    if gunzip.problem is not None:
        raise gunzip.problem from None


def _too_large(limits: Limits) -> FileProblem:
    return FileProblem("too_large", f"more than {limits.max_file_bytes} bytes once decompressed")


def _iter_text(stream: BinaryIO, fmt: Format, mapping: FieldMapping,
               limits: Limits) -> Iterator[Prompt | Rejected]:
    head = stream.read(8192)
    if head.startswith(codecs.BOM_UTF8):  # else the first key (CSV: header) gets a \ufeff
        head = head[3:]
    _check_text(head)
    stream = io.BufferedReader(_Prefixed(head, stream), 1 << 16)  # type: ignore[arg-type]
    if fmt == "jsonl":
        yield from _iter_jsonl(stream, mapping, limits)
    elif fmt == "json":
        yield from _iter_json(stream, mapping, limits)
    else:
        yield from _iter_csv(stream, mapping, limits, "\t" if fmt == "tsv" else ",")


# -- one source object ------------------------------------------------------------------------
@dataclass
class ParsedFile:
    """What reading one source object gave: prompts, rejected records, or a file problem."""

    prompts: list[Prompt] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    problem: FileProblem | None = None

    @property
    def records(self) -> int:
        return len(self.prompts) + len(self.rejected)


def read_prompt_file(
    s3: S3, bucket: str, obj: ObjectInfo, mapping: FieldMapping, limits: Limits, state_prefix: str
) -> ParsedFile:
    """Read, parse and validate one source object; quarantine what cannot be used.

    Record-level rejects go to one JSONL quarantine object; a file-level problem copies the file
    into quarantine next to a ``.reason.json``. Both keys depend only on (key, etag), so a
    retry or rerun rewrites the same objects.
    """
    parsed = ParsedFile()
    try:
        fmt, gz = detect_format(obj.key)
        if obj.size > limits.max_file_bytes:
            raise FileProblem("too_large", f"{obj.size} bytes > {limits.max_file_bytes}")
        if fmt == "parquet":
            import s3fs

            fs = s3fs.S3FileSystem(**s3.fsspec_options())
            with fs.open(f"{bucket}/{obj.key}", "rb", block_size=8 * 2**20) as fh:
                for item in parse_stream(fh, fmt, gz, mapping, limits):
                    (parsed.prompts if isinstance(item, Prompt) else parsed.rejected).append(item)
        else:
            body = s3.open(obj.key, bucket=bucket)
            try:
                for item in parse_stream(body, fmt, gz, mapping, limits):
                    (parsed.prompts if isinstance(item, Prompt) else parsed.rejected).append(item)
            finally:
                body.close()
    except FileProblem as problem:
        parsed.problem = problem
    source = s3.uri(obj.key, bucket=bucket)
    problem, read = parsed.problem, parsed.records
    if problem is not None and not problem.keeps_records:  # none of them can be trusted
        parsed.prompts, parsed.rejected = [], []
    if parsed.rejected:
        quarantine_records(s3, bucket, state_prefix, obj, [
            {"reason": r.reason, "detail": r.detail, "source": source, "etag": obj.etag,
             "row": r.row, "raw": r.raw} for r in parsed.rejected])
    if problem is not None:
        quarantine_file(s3, bucket, state_prefix, obj, {
            "reason": problem.reason, "detail": problem.detail, "source": source,
            "etag": obj.etag, "size": obj.size, "records_before_problem": read,
            "records_kept": parsed.records, "after_row": problem.row,
        }, copy=obj.size <= limits.max_file_bytes)
    return parsed


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
read_prompt_file_task = io_task(name="read-prompt-file")(read_prompt_file)
