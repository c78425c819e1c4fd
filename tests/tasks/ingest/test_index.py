"""tasks.ingest.index: near-duplicate prompts against the index and within a run (pure), and the
stored index (real S3)."""

from __future__ import annotations

import numpy as np
import pytest

from sftflow.tasks.dedup import fingerprint
from sftflow.tasks.ingest.index import (
    SignatureIndex,
    load_index,
    prompt_config,
    save_segment,
    save_snapshot,
)
from sftflow.tasks.ingest.prompts import prompt_id

CFG = prompt_config(0.9)
BRIDGE = "Please explain to a child how a bridge works"


def index_of(texts: list[str], cfg=CFG) -> SignatureIndex:
    index = SignatureIndex(cfg)
    index.add([prompt_id(t) for t in texts], fingerprint(texts, cfg).sigs,
              task_ids=list(range(100, 100 + len(texts))), batches=["b0"] * len(texts))
    return index


def check(index: SignatureIndex, texts: list[str]):
    return index.check([prompt_id(t) for t in texts], fingerprint(texts, index.cfg).sigs)


def test_a_retyped_prompt_matches_the_one_in_the_index():
    index = index_of([BRIDGE + ".", "Write a haiku about the sea in autumn", "What is 7 + 7?"])
    out = check(index, [BRIDGE + "!", "what is 8 + 8?", "Write a limerick about a cat"])
    assert out[0] is not None and out[0].prompt_id == prompt_id(BRIDGE + ".")
    assert out[0].similarity == 1.0
    assert out[1] is None  # digits are kept: another sum is another question
    assert out[2] is None


def test_near_duplicates_within_one_list_keep_the_first():
    texts = [BRIDGE + "?", "Summarise the article below in three bullet points please",
             BRIDGE + "!!", BRIDGE.upper(), "Summarise the article below in 3 bullet points please"]
    out = check(SignatureIndex(CFG), texts)
    assert out[0] is None and out[1] is None
    assert out[2].prompt_id == out[3].prompt_id == prompt_id(texts[0])
    assert out[4] is None  # '3' vs 'three': one word of nine differs


def test_threshold_decides():
    a = "Describe the water cycle for a school report in simple words and short sentences"
    b = "Describe the water cycle for a school report in simple words and long sentences"
    assert check(index_of([a]), [b])[0] is None  # Jaccard 0.67
    loose = prompt_config(0.5)
    assert check(index_of([a], loose), [b])[0] is not None


@pytest.mark.integration
def test_index_round_trips_through_s3(s3):
    root = "_sftflow/ingest/project-1"
    assert load_index(s3, s3.bucket, root, CFG) == (None, 0)
    index = index_of([BRIDGE, "Name three primary colours"])
    save_snapshot(s3, s3.bucket, root, index)
    index.add([prompt_id("A third prompt here")], fingerprint(["A third prompt here"], CFG).sigs,
              batches=["b1"])
    save_segment(s3, s3.bucket, root, "b1", index, [prompt_id("A third prompt here")])
    loaded, segments = load_index(s3, s3.bucket, root, CFG)
    assert segments == 1 and loaded.ids == index.ids and loaded.batches == ["b0", "b0", "b1"]
    assert np.array_equal(loaded.sigs, index.sigs)
    assert loaded.task_ids.tolist() == [100, 101, -1]
    # signatures made another way are not used: the caller rebuilds
    other = CFG.model_copy(update={"normalize_punctuation": False})
    assert load_index(s3, s3.bucket, root, other) == (None, 0)
    save_snapshot(s3, s3.bucket, root, loaded)
    assert load_index(s3, s3.bucket, root, CFG)[1] == 0
    s3.put_bytes(f"{root}/signatures/segments/bad.npz", b"not an npz")
    assert load_index(s3, s3.bucket, root, CFG) == (None, 0)
