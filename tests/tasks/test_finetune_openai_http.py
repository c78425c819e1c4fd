"""The ``openai`` backend's HTTP calls, without services: which answers are retried (timeouts,
408, 429, 5xx), which fail at once (other 4xx), and how many attempts are made."""

from __future__ import annotations

import httpx
import pytest

from sftflow.core.errors import ServiceUnavailable, SftflowError
from sftflow.tasks.finetune.openai_backend import OpenAIBackend


def _backend(answers: list, attempts: int = 4) -> tuple[OpenAIBackend, list[str]]:
    """A backend whose HTTP answers are ``answers`` in turn (a status code, or an exception)."""
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"id": "ftjob-1"} if answer < 400 else
                              {"error": {"message": f"status {answer}"}})

    backend = OpenAIBackend(None, "http://api.test/v1", "sk-test", attempts=attempts,
                            retry_delay_s=(0.001, 0.002), transport=httpx.MockTransport(handle))
    return backend, seen


@pytest.mark.parametrize("first", [429, 500, 503, 408])
def test_rate_limits_and_server_errors_are_retried(first):
    backend, seen = _backend([first, first, 200])
    assert backend.status("ftjob-1").backend_job_id == "ftjob-1"
    assert seen == ["GET /v1/fine_tuning/jobs/ftjob-1"] * 3


def test_timeouts_are_retried_and_then_reported_as_unavailable():
    backend, seen = _backend([httpx.ReadTimeout("slow"), 200])
    backend.cancel("ftjob-1")
    assert len(seen) == 2
    backend, seen = _backend([httpx.ConnectError("refused")] * 4)
    with pytest.raises(ServiceUnavailable, match="fine-tuning API at http://api.test/v1: refused"):
        backend.cancel("ftjob-1")
    assert len(seen) == 4


@pytest.mark.parametrize("status", [400, 401, 404, 409])
def test_other_client_errors_fail_at_once_with_the_apis_message(status):
    backend, seen = _backend([status, 200])
    with pytest.raises(SftflowError, match=f"POST http://api.test/v1/fine_tuning/jobs/j/cancel: {status} "
                                           f"status {status}"):
        backend.cancel("j")
    assert len(seen) == 1


def test_attempts_run_out_on_the_last_server_error():
    backend, seen = _backend([502] * 3, attempts=3)
    with pytest.raises(SftflowError, match="502 status 502"):
        backend.status("ftjob-1")
    assert len(seen) == 3
