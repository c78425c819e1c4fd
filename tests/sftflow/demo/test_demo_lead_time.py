"""sftflow.demo: the simulated annotators' ``lead_time``, set as Label Studio's editor would
(seconds on the task), from text lengths and from what was done with the draft. Pure."""

from __future__ import annotations

from sftflow.demo.run import simulated_lead_time

PROMPT = "In one sentence, what is a kestrel?"
ANSWER = "A kestrel is a small falcon that hovers while it hunts over open ground."


def test_an_accepted_draft_is_quicker_than_an_edited_one_and_both_beat_writing_from_nothing():
    accepted = simulated_lead_time("p1", PROMPT, ANSWER, ANSWER)
    edited = simulated_lead_time("p1", PROMPT, ANSWER, "A kestrel is a bird.")
    scratch = simulated_lead_time("p1", PROMPT, ANSWER, None)
    assert 0 < accepted < edited < scratch


def test_whitespace_alone_is_no_edit_and_longer_texts_take_longer():
    spaced = simulated_lead_time("p1", PROMPT, ANSWER, ANSWER.replace(" ", "  "))
    assert spaced < simulated_lead_time("p1", PROMPT, ANSWER, ANSWER) + 1  # only read, not typed
    assert simulated_lead_time("p1", PROMPT, ANSWER * 3, None) > simulated_lead_time(
        "p1", PROMPT, ANSWER, None)
    assert simulated_lead_time("p1", PROMPT * 5, ANSWER, None) > simulated_lead_time(
        "p1", PROMPT, ANSWER, None)


def test_the_time_is_plausible_and_the_same_on_a_rerun():
    """Writing 73 characters from nothing takes tens of seconds (think, type at ~48 wpm), an
    accepted draft a few; each prompt has its own pace within +-20 %, the same every run."""
    times = [simulated_lead_time(f"p{i}", PROMPT, ANSWER, None) for i in range(50)]
    assert all(20 < t < 45 for t in times) and len(set(times)) > 10
    assert times == [simulated_lead_time(f"p{i}", PROMPT, ANSWER, None) for i in range(50)]
    assert 4 < simulated_lead_time("p1", PROMPT, ANSWER, ANSWER) < 15
