"""What an ingest run takes in: selection of source objects, the max_records cut, the dedupe."""

from __future__ import annotations

from collections import Counter

from sftflow.tasks.adapters.s3 import ObjectInfo
from sftflow.tasks.ingest.intake import IntakeTally, cut_file, new_prompts, select_objects
from sftflow.tasks.ingest.ledger import _key_hash
from sftflow.tasks.ingest.parse import FileProblem, ParsedFile
from sftflow.tasks.ingest.prompts import Prompt, Rejected, prompt_id


def prompt(text: str, row: int) -> Prompt:
    return Prompt(text, prompt_id(text), row)


def parsed(n_prompts: int, rejected_rows: tuple[int, ...] = (), problem: FileProblem | None = None):
    rows = [r for r in range(1, n_prompts + len(rejected_rows) + 1) if r not in rejected_rows]
    return ParsedFile([prompt(f"p{r}", r) for r in rows],
                      [Rejected(r, "invalid_json") for r in rejected_rows], problem)


def test_select_skips_own_state_folders_and_unchanged_objects_and_caps_the_rest():
    listing = [ObjectInfo("in/a.jsonl", '"e1"', 1), ObjectInfo("in/", '""', 0),
               ObjectInfo("_sftflow/ingest/project-1/meta.json", '"m"', 1),
               ObjectInfo("in/b.jsonl", '"e2"', 1), ObjectInfo("in/c.jsonl", '"e3"', 1),
               ObjectInfo("in/d.jsonl", '"e4"', 1)]
    processed = {_key_hash("in/a.jsonl"): {"e1"}, _key_hash("in/b.jsonl"): {"old"}}
    sel = select_objects(listing, processed, "_sftflow/", max_files=2)
    assert (sel.listed, sel.unchanged) == (4, 1)
    assert [o.key for o in sel.todo] == ["in/b.jsonl", "in/c.jsonl"]  # b changed; d over the cap
    assert len(select_objects(listing, processed, "_sftflow").todo) == 3


def test_cut_keeps_the_first_records_in_row_order():
    f = parsed(4, rejected_rows=(2,))  # rows 1, 3, 4, 5 are prompts; row 2 is rejected
    whole = cut_file(f, None)
    assert whole.complete and whole.records == 5
    assert cut_file(f, 5).complete
    cut = cut_file(f, 3)
    assert not cut.complete
    assert [p.row for p in cut.prompts] == [1, 3] and [r.row for r in cut.rejected] == [2]
    nothing = cut_file(f, 0)
    assert (nothing.records, nothing.complete) == (0, False)


def test_tally_counts_files_records_reasons_and_stops_at_max_records():
    tally = IntakeTally()
    first = tally.take(parsed(3, rejected_rows=(4,), problem=FileProblem("unparseable")), 6)
    assert first.complete and first.summary(Counter(new=2, duplicate=1)) == {
        "records": 4, "quarantined": 1, "new": 2, "duplicate": 1, "problem": "unparseable"}
    second = tally.take(parsed(5), 6)
    assert not second.complete and second.records == 2
    assert (tally.files_read, tally.files_quarantined, tally.records, tally.quarantined) == (2, 1, 6, 1)
    assert tally.reasons == {"invalid_json": 1, "file:unparseable": 1}


def test_new_prompts_dedupes_lazily_against_known_ids():
    a, b = prompt("Alpha", 1), prompt("beta", 2)
    known = {prompt_id("gamma")}
    counts: Counter[str] = Counter()
    taken = []
    for p in new_prompts([a, prompt("ALPHA ", 2), b, prompt("Gamma", 4), a], known, counts):
        taken.append(p)
        if p is b:
            known.discard(a.prompt_id)  # e.g. Label Studio refused it meanwhile: new again
    assert taken == [a, b, a]
    assert counts == {"new": 3, "duplicate": 2}
    assert known == {prompt_id("gamma"), a.prompt_id, b.prompt_id}
