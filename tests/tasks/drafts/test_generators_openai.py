"""CONTRACT TEST: ``OpenAIChatGenerator`` against the local OpenAI contract server's
``POST /v1/chat/completions`` (the real API is unreachable from here), behind the fault proxy:
what is sent, which failures are retried, and that a failure stays one prompt's outcome."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from sftflow.tasks.drafts.generators import HttpStatusError, OpenAIChatGenerator, failure_reason
from tests.contract.openai_server import OpenAIContractServer
from tests.faults.proxy import Fault, FaultProxy

KEY = "sk-contract-test"
MODEL = "gpt-4o-mini-2024-07-18"
CHAT = r"^/v1/chat/completions"


@pytest.fixture()
def endpoint():
    """(server, proxy, make): ``make(**kw)`` builds a generator talking through the proxy."""
    with OpenAIContractServer(api_key=KEY) as server:
        up = urlparse(server.base_url)
        with FaultProxy(up.hostname, up.port) as proxy:
            made: list[OpenAIChatGenerator] = []

            def make(**kw) -> OpenAIChatGenerator:
                kw = {"model_version": "ft-test", "attempts": 3, "timeout_s": 1.0,
                      "retry_delay_s": (0.01, 0.02), "concurrency": 1, **kw}
                gen = OpenAIChatGenerator(f"{proxy.url}/v1", kw.pop("model", MODEL),
                                          kw.pop("api_key", KEY), **kw)
                made.append(gen)
                return gen

            yield server, proxy, make
            for gen in made:
                gen.close()


def test_contract_drafts_in_order_with_the_training_system_prompt(endpoint):
    server, _, make = endpoint
    gen = make(system_prompt="Answer briefly.", max_new_tokens=4, concurrency=3)
    out = gen.generate(["Name a colour.", "Name a very large and famous sea please", "Hi"])
    assert out == ["Draft: Name a colour.", "Draft: Name a very", "Draft: Hi"]
    bodies = sorted(server.state.chats, key=lambda b: b["messages"][-1]["content"])
    assert bodies[0]["messages"] == [{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": "Hi"}]
    assert {(b["model"], b["max_tokens"], b["temperature"]) for b in bodies} == {(MODEL, 4, 0)}


def test_contract_transient_errors_are_retried_and_a_lasting_one_fails_that_prompt_only(endpoint):
    _, proxy, make = endpoint
    gen = make()
    proxy.add(Fault("status", method="POST", path=CHAT, status=503, times=1))
    assert gen.generate(["one"]) == ["Draft: one"]  # second attempt
    proxy.add(Fault("status", method="POST", path=CHAT, status=500, times=3))  # every attempt
    out = gen.generate(["two", "three"])
    assert isinstance(out[0], HttpStatusError) and failure_reason(out[0]) == "http 500"
    assert out[1] == "Draft: three"
    assert proxy.requests == 2 + 3 + 1


def test_contract_client_errors_are_not_retried(endpoint):
    server, proxy, make = endpoint
    out = make(model="no-such-model").generate(["x"])
    assert failure_reason(out[0]) == "http 404" and "does not exist" in str(out[0])
    out = make(api_key="sk-wrong").generate(["x"])
    assert failure_reason(out[0]) == "http 401"
    assert proxy.requests == 2 and server.state.chats == []


def test_contract_timeouts_and_dropped_connections_are_reasons(endpoint):
    _, proxy, make = endpoint
    gen = make(attempts=1)
    proxy.add(Fault("slow_response", method="POST", path=CHAT, seconds=2.0, times=1))
    proxy.add(Fault("reset", method="POST", path=CHAT, times=1))
    assert [failure_reason(r) for r in gen.generate(["a", "b"])] == ["timeout", "connection"]
    assert gen.generate(["c"]) == ["Draft: c"]
