"""Parquet shards, OpenAI / TRL JSONL and the dataset card."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import yaml

from sftflow.tasks.versions import formats
from tests.tasks._datasets import final_rows


def test_parquet_is_byte_identical_for_identical_rows_and_keeps_every_column():
    rows = final_rows(50)
    a, b = formats.parquet_bytes(rows), formats.parquet_bytes([dict(r) for r in rows])
    assert a == b
    table = pq.read_table(io.BytesIO(a))
    assert table.column_names == list(formats.COLUMNS)
    assert table.to_pylist() == rows
    assert formats.parquet_bytes(rows[:49]) != a


def test_row_hash_covers_split_and_text():
    row = final_rows(1)[0]
    moved = dict(row, split="eval" if row["split"] == "train" else "train")
    assert formats.row_hash(moved) != row["row_hash"]
    assert formats.row_hash(dict(row, completion="other")) != row["row_hash"]
    assert formats.row_hash(dict(row)) == row["row_hash"]


def test_openai_and_trl_lines():
    rows = final_rows(2, tag=" «ü»")
    chat = [json.loads(line) for line in formats.openai_chat_jsonl(rows, "Be brief.").splitlines()]
    assert chat[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": rows[0]["prompt"]},
        {"role": "assistant", "content": rows[0]["completion"]},
    ]
    trl = [json.loads(line) for line in formats.trl_jsonl(rows).splitlines()]
    assert trl == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def test_card_front_matter_is_valid_hf_yaml():
    card = formats.dataset_card(dataset="d", version="v1", rows={"train": 9, "eval": 1},
                                sizes={"train": 100, "eval": 10}, stats={"filters": {"kept": 10}},
                                source={"project_id": 3}, config={"eval_fraction": 0.1})
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    default = meta["configs"][0]
    assert default["config_name"] == "default"
    assert default["data_files"] == [{"split": "train", "path": "data/train/*.parquet"},
                                     {"split": "validation", "path": "data/validation/*.parquet"}]
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {
        "train": 9, "validation": 1}
    assert '"kept": 10' in card


def test_schema_columns_are_the_fields_of_the_row_type():
    from sftflow.tasks.versions.rows import SftRow

    assert formats.COLUMNS == tuple(SftRow.__annotations__)
    assert set(formats.COLUMNS) - SftRow.__required_keys__ == {"cluster_id", "split", "row_hash"}
