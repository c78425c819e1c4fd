"""The few-shot baseline's prompts (issue #20): k train rows chosen by a recorded seed, prepended
to each eval prompt in the format the model trains on, and only the completion scored. Pure,
plus the tiny model's real tokenizer (no model, no services)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import pytest

from sftflow.core.hashing import canonical_json, sha256_hex
from sftflow.tasks.finetune import few_shot, tokens
from sftflow.tasks.finetune.backends import FewShotSpec, Hyperparameters, JobSpec
from sftflow.tasks.finetune.training import to_example
from tests.tasks._finetune import tiny_chat_model, tiny_model  # noqa: F401

SYSTEM = {"role": "system", "content": "Answer in one sentence."}


def _row(i: int, system: bool = True) -> list[dict[str, str]]:
    return [*([SYSTEM] if system else []), {"role": "user", "content": f"Prompt {i}: explain item {i}."},
            {"role": "assistant", "content": f"Item {i} is explained."}]


TRAIN = [_row(i) for i in range(20)]


def test_the_examples_are_chosen_by_the_seed_from_the_kept_train_rows_whatever_their_order():
    pool = [i for i in range(20) if i != 5]  # row 5 was over max_length: never an example
    chosen = few_shot.choose_examples(TRAIN, pool, k=3, seed=7)
    assert len(chosen) == 3 == len(set(chosen)) and set(chosen) <= set(pool)
    assert chosen == few_shot.choose_examples(TRAIN, pool, k=3, seed=7)  # deterministic
    assert chosen != few_shot.choose_examples(TRAIN, pool, k=3, seed=8)
    # the choice follows the rows' content, not their position in the file
    order = list(reversed(range(20)))
    moved = few_shot.choose_examples([TRAIN[i] for i in order], [order.index(i) for i in pool], k=3, seed=7)
    assert [order[i] for i in moved] == chosen
    # ordered by sha256(seed, row): the same rule a reader can recompute
    keys = sorted((sha256_hex(b"7\n" + canonical_json(TRAIN[i])), i) for i in pool)
    assert chosen == [i for _, i in keys[:3]]
    assert sorted(few_shot.choose_examples(TRAIN, [1, 2], k=3, seed=7)) == [1, 2]  # fewer rows than k
    assert few_shot.choose_examples(TRAIN, pool, k=0, seed=7) == []


def test_chat_shots_go_between_the_system_prompt_and_the_eval_prompt():
    shots = [to_example(TRAIN[i], "chat") for i in (3, 4)]
    row = to_example(_row(99), "chat")
    shot = few_shot.with_shots(shots, row, eos="</s>")
    assert shot["completion"] == row["completion"]
    assert shot["prompt"] == [SYSTEM, TRAIN[3][1], TRAIN[3][2], TRAIN[4][1], TRAIN[4][2], _row(99)[1]]
    # a row without a system prompt gets none from the examples
    bare = few_shot.with_shots(shots, to_example(_row(99, system=False), "chat"), eos="</s>")
    assert bare["prompt"][0] == TRAIN[3][1] and SYSTEM not in bare["prompt"]


def test_plain_shots_are_the_trained_texts_one_after_the_other():
    shots = [to_example(TRAIN[i], "prompt_completion") for i in (3, 4)]
    row = to_example(_row(99), "prompt_completion")
    shot = few_shot.with_shots(shots, row, eos="</s>")
    assert shot == {"prompt": ("Prompt 3: explain item 3.Item 3 is explained.</s>"
                               "Prompt 4: explain item 4.Item 4 is explained.</s>Prompt 99: explain item 99."),
                    "completion": "Item 99 is explained."}


@pytest.mark.parametrize("loss", ["completion", "assistant"])
def test_only_the_completion_is_scored_in_a_chat_few_shot_row(tiny_chat_model, loss):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    row = to_example(_row(99), "chat")
    shot = few_shot.with_shots([to_example(TRAIN[i], "chat") for i in (3, 4, 6)], row, eos=tok.eos_token)
    ids, labels = tokens.tokenize_example(tok, shot, loss)
    zero_ids, zero_labels = tokens.tokenize_example(tok, row, loss)
    scored = [t for t in labels if t != tokens.IGNORE]
    assert scored == [t for t in zero_labels if t != tokens.IGNORE]  # the same tokens, no more
    assert tok.decode(scored) == "Item 99 is explained.<|end|>"
    start = labels.index(scored[0])
    assert labels[:start] == [tokens.IGNORE] * start and start > len(zero_ids)  # the examples: unscored
    assert tok.decode(ids[:start]).count("<|assistant|>") == 4  # three answers shown, then the prompt's


def test_only_the_completion_is_scored_in_a_plain_few_shot_row(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = to_example(_row(99), "prompt_completion")
    shot = few_shot.with_shots([to_example(TRAIN[i], "prompt_completion") for i in (3, 4)], row,
                               eos=tok.eos_token)
    _, labels = tokens.tokenize_example(tok, shot)
    _, zero_labels = tokens.tokenize_example(tok, row)
    scored = [t for t in labels if t != tokens.IGNORE]
    assert scored == [t for t in zero_labels if t != tokens.IGNORE]
    assert tok.decode(scored) == "Item 99 is explained.</s>"


def test_the_cache_key_is_the_base_model_version_k_seed_and_what_decides_the_eval_rows():
    def spec(**kw) -> JobSpec:
        return JobSpec(**{"job": "ft-a", "dataset": "qa", "version": "v1", "base_model": "/m",
                          "hyperparameters": Hyperparameters(max_steps=8), "train_files": [],
                          "eval_files": [], "output_uri": "s3://b/models/ft-a", **kw})

    fs = FewShotSpec(k=3, seed=0)
    key = few_shot.cache_key(spec(), fs)
    assert key == few_shot.cache_key(spec(job="ft-b", method="full", output_uri="s3://b/models/ft-b"), fs)
    assert key == few_shot.cache_key(spec(hyperparameters=Hyperparameters(max_steps=9, learning_rate=1)), fs)
    for other in (spec(version="v2"), spec(base_model="/n"), spec(dataset="qb"),
                  spec(hyperparameters=Hyperparameters(max_steps=8, max_length=64)),
                  spec(hyperparameters=Hyperparameters(max_steps=8, batch_size=2))):
        assert few_shot.cache_key(other, fs) != key
    assert few_shot.cache_key(spec(), FewShotSpec(k=2, seed=0)) != key
    assert few_shot.cache_key(spec(), FewShotSpec(k=3, seed=1)) != key
    assert few_shot.cache_uri("s3://b/models/", key) == f"s3://b/models/_few_shot/{key}.json"
