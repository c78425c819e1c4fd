"""The fine-tune's status polls (flows/finetune.py ``_backoff``): the backend's own cap unless the
run sets one. Pure: no Prefect, no services."""

from __future__ import annotations

from sftflow.flows.finetune import FinetuneParams, _backoff
from sftflow.tasks.finetune.openai_backend import OpenAIBackend
from sftflow.tasks.finetune.trl_backend import TrlBackend


def _params(**kw) -> FinetuneParams:
    return FinetuneParams(dataset="d", base_model="m", **kw)


def _delays(backoff, n: int = 12) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_a_local_training_is_polled_at_most_every_5_s_and_a_remote_one_backs_off_to_60_s():
    """The demo's second round noticed its finished local training ~40 s late under the old
    60 s cap shared by every backend."""
    trl = _delays(_backoff(_params(), TrlBackend))
    assert trl[0] <= 2.0 * 1.25 and max(trl) <= 5.0 and trl[-1] >= 5.0 * 0.75
    remote = _delays(_backoff(_params(), OpenAIBackend))
    assert max(remote) <= 60.0 and remote[-1] >= 60.0 * 0.75


def test_the_runs_own_cap_wins_and_never_falls_below_the_first_pause():
    assert max(_delays(_backoff(_params(poll_max_s=1.0, poll_min_s=0.2), OpenAIBackend))) <= 1.0
    assert min(_delays(_backoff(_params(poll_min_s=3.0, poll_max_s=1.0), TrlBackend))) >= 3.0 * 0.75
