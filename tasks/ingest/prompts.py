"""Prompt files: reading, validating, normalising, ``prompt_id``, quarantine and the ingest ledger.

Pure logic (``normalise``, ``prompt_id``, ``parse_stream``, ``FieldMapping``) needs neither
Prefect nor services. The S3-facing parts take an ``S3`` client and never read settings.

State written into the *source* bucket, under ``<state_prefix>/`` (default ``_sftflow/``)::

    ingest/project-<id>/meta.json                   which Label Studio project this ledger is for
    ingest/project-<id>/snapshot.json               prompt_ids in the project at the last full
                                                    reconcile, and its task count then
    ingest/project-<id>/segments/<batch>.json       prompt_ids of each confirmed import batch
    ingest/project-<id>/pending/<batch>.json        a batch sent whose outcome is not yet known
    ingest/project-<id>/objects/<key-hash>/<etag>   a source object fully processed
    quarantine/records/<key>@<etag>.jsonl           rejected records, with reason and line/row
    quarantine/files/<key>@<etag>                   a copy of a rejected file (+ ``.reason.json``)
    quarantine/rejected/<batch>.jsonl               tasks of a batch that Label Studio refused
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field, field_validator

from sftflow.core.clock import utc_now, utc_now_iso
from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3, ObjectInfo, PreconditionFailed
from sftflow.tasks.dedup import normalize
from sftflow.tasks.runtime.declare import io_task

# -- prompt identity --------------------------------------------------------------------------
# One normalisation for prompt identity and dedup's exact keys: NFKC, casefold, whitespace
# runs collapsed to one space, ends stripped.
normalise = normalize


def prompt_id(text: str) -> str:
    """The stable id of a prompt: first 32 hex chars of sha256 of its normalised text."""
    return sha256_hex(normalise(text).encode("utf-8", "surrogatepass"))[:32]


# -- configuration ----------------------------------------------------------------------------
#: Task data keys written by ingest; ``keep_fields`` may not reuse them.
RESERVED_KEYS = frozenset({"prompt", "prompt_id", "source", "source_etag", "source_row", "ingest_batch"})


class FieldMapping(BaseModel):
    """Where the prompt is in each input record."""

    prompt_field: str = Field("prompt", description="Record field holding the prompt text.")
    input_field: str | None = Field(
        None,
        description="Optional second field joined to the prompt (Alpaca style: prompt_field="
        "'instruction', input_field='input'). Empty or absent input leaves the prompt alone.",
    )
    join_template: str = Field(
        "{prompt}\n\n{input}",
        description="How prompt and input are joined; must contain {prompt} and {input}.",
    )
    keep_fields: list[str] = Field(
        default_factory=list,
        description="Other record fields copied into the Label Studio task data (provenance).",
    )

    @field_validator("join_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        names = {n for _, n, _, _ in string.Formatter().parse(v) if n is not None}
        if names != {"prompt", "input"}:
            raise ValueError("join_template must use exactly the fields {prompt} and {input}")
        return v

    @field_validator("keep_fields")
    @classmethod
    def _not_reserved(cls, v: list[str]) -> list[str]:
        clash = sorted(set(v) & RESERVED_KEYS)
        if clash:
            raise ValueError(f"keep_fields may not name ingest's own keys: {clash}")
        return v


class Limits(BaseModel):
    max_prompt_chars: int = Field(100_000, gt=0, description="Longer prompts are quarantined.")
    max_file_bytes: int = Field(
        512 * 2**20, gt=0,
        description="Larger source objects are quarantined without reading; a compressed object "
        "is also cut where its decompressed bytes pass this (the rest is quarantined).",
    )


# -- parsing ----------------------------------------------------------------------------------
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
    """The whole file cannot be read; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Prompt:
    prompt: str
    prompt_id: str
    row: int  # 1-based line (JSONL/CSV, header excluded for CSV) or array/row index + 1
    extra: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    row: int
    reason: str  # invalid_json | invalid_utf8 | not_object | missing_prompt | wrong_type | ...
    detail: str = ""
    raw: str = ""


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


def _raw_preview(raw: Any, limit: int = 500) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    elif not isinstance(raw, str):
        raw = json.dumps(raw, default=str, ensure_ascii=False)
    return raw[:limit]


def _jsonable(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


#: C0 control characters other than tab, newline and carriage return. U+0000 is refused by
#: Label Studio on PostgreSQL (a 500 for the whole import request); the others are no text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _control_char(text: str) -> str | None:
    """Where the first C0 control character (other than tab/LF/CR) is, if any."""
    m = _CONTROL.search(text)
    return None if m is None else f"U+{ord(m.group()):04X} at char {m.start()}"


def to_prompt(
    record: Any, row: int, mapping: FieldMapping, limits: Limits, raw: Any = None
) -> Prompt | Rejected:
    """Validate one decoded record and build its prompt, or say why it is rejected."""
    if not isinstance(record, dict):
        return Rejected(row, "not_object", type(record).__name__, _raw_preview(raw or record))
    text = record.get(mapping.prompt_field)
    if text is None:
        return Rejected(row, "missing_prompt", mapping.prompt_field, _raw_preview(raw or record))
    if not isinstance(text, str):
        return Rejected(row, "wrong_type", f"{mapping.prompt_field} is {type(text).__name__}",
                        _raw_preview(raw or record))
    if mapping.input_field:
        extra_input = record.get(mapping.input_field)
        if extra_input is not None and not isinstance(extra_input, str):
            return Rejected(row, "wrong_type", f"{mapping.input_field} is {type(extra_input).__name__}",
                            _raw_preview(raw or record))
        if extra_input and extra_input.strip():
            text = mapping.join_template.format(prompt=text, input=extra_input)
    if not text.strip():
        return Rejected(row, "empty_prompt", mapping.prompt_field, _raw_preview(raw or record))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Rejected(row, "invalid_utf8", "prompt has undecodable bytes", _raw_preview(raw or record))
    if len(text) > limits.max_prompt_chars:
        return Rejected(row, "too_large", f"{len(text)} chars > {limits.max_prompt_chars}",
                        _raw_preview(raw or record))
    extra = {f: _jsonable(record.get(f)) for f in mapping.keep_fields} or None
    for name, value in [("prompt", text), *(extra or {}).items()]:
        where = _control_char(value) if isinstance(value, str) else None
        if where:
            return Rejected(row, "control_chars", f"{name}: {where}", _raw_preview(raw or record))
    return Prompt(text, prompt_id(text), row, extra)


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


def _decompressed(stream: BinaryIO, gz: bool, limit: int) -> _Capped:
    """The object's bytes, gunzipped when they are gzip data, at most ``limit`` of them."""
    head, stream = _sniff(stream, 2)
    if head[:2] == b"\x1f\x8b":  # gzip magic, whatever the name says
        stream = gzip.GzipFile(fileobj=io.BufferedReader(stream, 1 << 20))  # type: ignore[arg-type,assignment]
    elif gz:
        raise FileProblem("unparseable", "named .gz but not gzip data")
    return _Capped(stream, limit)


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
            yield Rejected(row, "invalid_utf8", str(err), _raw_preview(line))
            continue
        record = _loads(text, row)
        yield record if isinstance(record, Rejected) else to_prompt(record, row, mapping, limits,
                                                                     raw=text)


def _loads(text: str, row: int) -> Any:
    """One JSON record, or why it cannot be read (too deeply nested: Python's parser recurses)."""
    try:
        return json.loads(text)
    except ValueError as err:
        return Rejected(row, "invalid_json", str(err), text[:500])
    except RecursionError:
        return Rejected(row, "too_deep", "nested too deeply to parse", text[:500])


def _iter_json(stream: BinaryIO, mapping: FieldMapping, limits: Limits) -> Iterator[Prompt | Rejected]:
    head, stream = _sniff(stream)
    if not head.lstrip().startswith(b"["):  # one object, or JSON lines under a .json name
        data = stream.read()  # bounded by max_file_bytes (decompressed)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise FileProblem("invalid_utf8", str(err)) from err
        yield from _iter_jsonl(io.BytesIO(data), mapping, limits)
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
        record = _loads(text, row)
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
    source: Any, mapping: FieldMapping, limits: Limits
) -> Iterator[Prompt | Rejected]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as err:
        raise FileProblem("unparseable", f"Parquet: {err}") from err
    names = set(pf.schema_arrow.names)
    wanted = [mapping.prompt_field, mapping.input_field, *mapping.keep_fields]
    columns = [c for c in dict.fromkeys(wanted) if c and c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield to_prompt(record, row, mapping, limits)


def parse_stream(
    stream: BinaryIO, fmt: Format, gz: bool, mapping: FieldMapping, limits: Limits
) -> Iterator[Prompt | Rejected]:
    """Records of one file, streamed. Raises FileProblem for problems of the whole file.

    At most ``limits.max_file_bytes`` are read (after decompression): past that, FileProblem
    ``too_large`` is raised, the records before the cut having been yielded (except the last
    one read, which the cut may have truncated). Parquet needs random access: pass a seekable
    stream (a gzip-wrapped Parquet file is spooled to a temporary file first).
    """
    if fmt == "parquet":
        if gz or not stream.seekable():
            with tempfile.SpooledTemporaryFile(max_size=64 * 2**20) as spool:
                capped = _decompressed(stream, gz, limits.max_file_bytes)
                shutil.copyfileobj(capped, spool, 1 << 20)
                if capped.exceeded:
                    raise _too_large(limits)
                spool.seek(0)
                yield from _iter_parquet(spool, mapping, limits)
        else:
            yield from _iter_parquet(stream, mapping, limits)
        return
    capped = _decompressed(stream, gz, limits.max_file_bytes)
    held: Prompt | Rejected | None = None  # yielded once the next one is read (see above)
    try:
        for item in _iter_text(io.BufferedReader(capped, 1 << 20), fmt, mapping, limits):  # type: ignore[arg-type]
            if held is not None:
                yield held
            held = item
    except (EOFError, gzip.BadGzipFile, OSError) as err:  # truncated or corrupt compression
        raise FileProblem("unparseable", f"{type(err).__name__}: {err}") from err
    except FileProblem:
        if not capped.exceeded:
            raise
    if capped.exceeded:
        raise _too_large(limits)
    if held is not None:
        yield held


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


def _clean_etag(etag: str) -> str:
    return etag.strip('"')


def quarantine_keys(state_prefix: str, key: str, etag: str) -> tuple[str, str]:
    """(records quarantine key, file quarantine key) of one source object version."""
    tag = _clean_etag(etag)
    base = f"{state_prefix.rstrip('/')}/quarantine"
    return f"{base}/records/{key}@{tag}.jsonl", f"{base}/files/{key}@{tag}"


def rejected_batch_key(state_prefix: str, batch: str) -> str:
    """Quarantine key of the tasks of one import batch that Label Studio refused."""
    return f"{state_prefix.rstrip('/')}/quarantine/rejected/{batch}.jsonl"


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
    records_key, file_key = quarantine_keys(state_prefix, obj.key, obj.etag)
    source = s3.uri(obj.key, bucket=bucket)
    if parsed.rejected:
        lines = (
            json.dumps(
                {"reason": r.reason, "detail": r.detail, "source": source, "etag": obj.etag,
                 "row": r.row, "raw": r.raw},
                ensure_ascii=False,
            )
            for r in parsed.rejected
        )
        s3.put_bytes(records_key, ("\n".join(lines) + "\n").encode("utf-8", "replace"),
                     bucket=bucket, content_type="application/x-ndjson")
    if parsed.problem is not None:
        reason = {
            "reason": parsed.problem.reason, "detail": parsed.problem.detail, "source": source,
            "etag": obj.etag, "size": obj.size,
            "records_before_problem": parsed.records,
        }
        if obj.size <= limits.max_file_bytes:
            s3.client.copy_object(Bucket=bucket, Key=file_key,
                                  CopySource={"Bucket": bucket, "Key": obj.key})
            reason["copy"] = s3.uri(file_key, bucket=bucket)
        s3.put_bytes(f"{file_key}.reason.json", json.dumps(reason, indent=2).encode(),
                     bucket=bucket, content_type="application/json")
    return parsed


def bucket_exists(s3: S3, bucket: str) -> bool:
    """Whether the bucket exists (checked first: some S3 servers create buckets on write)."""
    from botocore.exceptions import ClientError

    try:
        s3.client.head_bucket(Bucket=bucket)
    except ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 404):
            return False
        raise
    return True


# -- the ledger -------------------------------------------------------------------------------
def _key_hash(key: str) -> str:
    return sha256_hex(key)[:32]


@dataclass
class LedgerState:
    """What the ledger says about a project: its prompt_ids and the task count to expect."""

    ids: set[str]
    expected_tasks: int
    pending: list[str]  # batches sent whose outcome is not known (a run stopped midway)
    segment_keys: list[str]
    found: bool  # False: no ledger for this project yet (or one for another project instance)


class PendingBatch(BaseModel):
    """``pending/<batch>.json``: a batch about to be sent, and when (its request may live on
    the server for a while after that)."""

    batch: str
    tasks: int
    at: datetime


class Ledger:
    """Per-project record of imported prompt_ids and processed source objects, in S3.

    Every write is a whole small object, so a crash leaves either the old or the new state.
    A batch is written as ``pending`` before it is sent and as a ``segment`` once confirmed;
    pending markers left by a crash are resolved by reconciling against the project.
    """

    def __init__(self, s3: S3, bucket: str, state_prefix: str, project_id: int,
                 fence: Callable[[], None] | None = None):
        """``fence()`` is called before every write and raises when this run may no longer
        write (the ingest lock's ``S3Lock.fence``: a holder whose lease was taken over)."""
        self.s3, self.bucket = s3, bucket
        self.root = f"{state_prefix.rstrip('/')}/ingest/project-{project_id}"
        self.project_id = project_id
        self.fence = fence or (lambda: None)

    def uri(self) -> str:
        return self.s3.uri(self.root + "/", bucket=self.bucket)

    # reading
    def _get_json(self, key: str) -> Any:
        return json.loads(self.s3.get_bytes(key, bucket=self.bucket)[0])

    def _read_many(self, keys: list[str]) -> list[Any]:
        if not keys:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            return list(pool.map(self._get_json, keys))

    def load(self, project_created_at: str) -> LedgerState:
        """The ledger's view. A ledger written for another project instance (same id, other
        creation time, e.g. after a Label Studio reset) is wiped and reported as not found."""
        try:
            meta = self._get_json(f"{self.root}/meta.json")
        except KeyError:
            meta = None
        if meta is not None and meta.get("project_created_at") != project_created_at:
            self.fence()
            self.s3.delete((o.key for o in self.s3.list(self.root + "/", bucket=self.bucket)),
                           bucket=self.bucket)
            meta = None
        if meta is None:
            self.fence()
            self.s3.put_bytes(
                f"{self.root}/meta.json",
                json.dumps({"project_id": self.project_id, "project_created_at": project_created_at,
                            "created_at": utc_now_iso()}).encode(),
                bucket=self.bucket,
            )
            return LedgerState(set(), 0, [], [], found=False)
        keys = self.segment_keys()
        pending = sorted(o.key.rsplit("/", 1)[-1].removesuffix(".json")
                         for o in self.s3.list(f"{self.root}/pending/", bucket=self.bucket))
        try:
            snap = self._get_json(f"{self.root}/snapshot.json")
        except KeyError:
            snap = {"ids": [], "task_number": 0}
        ids = set(snap["ids"])
        expected = int(snap["task_number"])
        for seg in self._read_many(keys):
            ids.update(seg["ids"])
            expected += int(seg["tasks_added"])
        return LedgerState(ids, expected, pending, keys, found=True)

    def processed_objects(self) -> dict[str, set[str]]:
        """key hash -> etags already processed (one listing, no reads)."""
        done: dict[str, set[str]] = {}
        prefix = f"{self.root}/objects/"
        for o in self.s3.list(prefix, bucket=self.bucket):
            khash, _, etag = o.key[len(prefix):].partition("/")
            done.setdefault(khash, set()).add(etag)
        return done

    @staticmethod
    def is_processed(done: dict[str, set[str]], obj: ObjectInfo) -> bool:
        return _clean_etag(obj.etag) in done.get(_key_hash(obj.key), ())

    def segment_keys(self) -> list[str]:
        """Keys of every confirmed batch's segment."""
        return [o.key for o in self.s3.list(f"{self.root}/segments/", bucket=self.bucket)]

    # writing
    def segment_key(self, batch: str) -> str:
        return f"{self.root}/segments/{batch}.json"

    def drop_pending(self, batch: str) -> None:
        self.fence()
        self.s3.delete([f"{self.root}/pending/{batch}.json"], bucket=self.bucket)

    def mark_pending(self, batch: str, tasks: int) -> None:
        """Before a batch is sent. Recovery finds its tasks by ``data.ingest_batch``."""
        self.fence()
        self.s3.put_bytes(f"{self.root}/pending/{batch}.json",
                          json.dumps({"batch": batch, "tasks": tasks, "at": utc_now_iso()}).encode(),
                          bucket=self.bucket)

    def pending_marker(self, batch: str) -> PendingBatch:
        """The marker of a batch left pending. One that cannot be read counts as written just
        now, for more tasks than any batch has: its outcome is awaited for the longest."""
        try:
            return PendingBatch.model_validate_json(
                self.s3.get_bytes(f"{self.root}/pending/{batch}.json", bucket=self.bucket)[0])
        except (KeyError, ValueError):
            return PendingBatch(batch=batch, tasks=2**31, at=utc_now())

    def confirm(self, batch: str, ids: Iterable[str], tasks_added: int) -> str:
        """Record a batch's landed prompt_ids, then drop its pending marker."""
        self.fence()
        key = self.segment_key(batch)
        body = json.dumps({"batch": batch, "ids": sorted(ids), "tasks_added": tasks_added,
                           "at": utc_now_iso()}).encode()
        try:
            self.s3.put_bytes(key, body, bucket=self.bucket, if_none_match=True)
        except PreconditionFailed:
            pass  # already confirmed by an earlier attempt: same batch, same content
        self.drop_pending(batch)
        return key

    def write_snapshot(self, ids: Iterable[str], task_number: int, superseded: list[str]) -> None:
        """Replace the ledger by what the project holds now; older segments are dropped.

        A crash between the two steps leaves extra segments, so the expected task count is
        too high and the next run reconciles again: slower, never wrong.
        """
        self.fence()
        self.s3.put_bytes(
            f"{self.root}/snapshot.json",
            json.dumps({"ids": sorted(ids), "task_number": task_number, "at": utc_now_iso()}).encode(),
            bucket=self.bucket,
        )
        self.s3.delete(superseded, bucket=self.bucket)

    def mark_object(self, obj: ObjectInfo, summary: dict[str, Any]) -> None:
        self.fence()
        key = f"{self.root}/objects/{_key_hash(obj.key)}/{_clean_etag(obj.etag)}"
        self.s3.put_bytes(key, json.dumps({"key": obj.key, "etag": obj.etag, **summary,
                                           "at": utc_now_iso()}).encode(), bucket=self.bucket)


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
read_prompt_file_task = io_task(name="read-prompt-file")(read_prompt_file)
