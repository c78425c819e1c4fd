"""The ``openai`` backend's HTTP calls against the OpenAI contract server (a CONTRACT TEST
double: the real API is unreachable from here) behind the fault proxy: which answers are
retried (timeouts, dropped connections, 408, 429, 5xx), which fail at once (other 4xx), and
how many attempts are made."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from sftflow.core.errors import ServiceUnavailable, SftflowError
from sftflow.tasks.finetune.openai_backend import OpenAIBackend
from tests.contract.openai_server import OpenAIContractServer
from tests.faults.proxy import Fault, FaultProxy

KEY = "sk-contract-test"
JOBS = r"^/v1/fine_tuning/jobs"


@pytest.fixture()
def api():
    """(proxy, backend): the backend talks to the contract server through the proxy."""
    with OpenAIContractServer(api_key=KEY) as server:
        up = urlparse(server.base_url)
        with FaultProxy(up.hostname, up.port) as proxy:
            backend = OpenAIBackend(None, f"{proxy.url}/v1", KEY, attempts=4, timeout_s=1.0,
                                    retry_delay_s=(0.01, 0.02))
            yield proxy, backend


@pytest.mark.parametrize("first", [429, 500, 503, 408])
def test_rate_limits_and_server_errors_are_retried(api, first):
    proxy, backend = api
    proxy.add(Fault("status", path=JOBS, status=first, times=2))
    assert backend.find_job("ft-none") is None  # the third attempt reached the server
    assert proxy.applied["status"] == 2 and proxy.requests == 3


def test_timeouts_and_dropped_connections_are_retried_then_reported_as_unavailable(api):
    proxy, backend = api
    proxy.add(Fault("slow_response", path=JOBS, seconds=2.0, times=1))  # past the 1 s timeout
    assert backend.find_job("ft-none") is None
    assert proxy.requests == 2
    proxy.add(Fault("reset", path=JOBS, times=0))
    with pytest.raises(ServiceUnavailable, match=f"fine-tuning API at {proxy.url}/v1"):
        backend.find_job("ft-none")
    assert proxy.requests == 2 + 4


def test_other_client_errors_fail_at_once_with_the_apis_message(api):
    proxy, backend = api
    with pytest.raises(SftflowError, match="GET .*/fine_tuning/jobs/ftjob-missing: 404"):
        backend.status("ftjob-missing")  # the contract server's own 404
    assert proxy.requests == 1
    for status in (400, 401, 409):
        proxy.add(Fault("status", path=JOBS, status=status, times=1))
        with pytest.raises(SftflowError, match=f"{status}"):
            backend.find_job("ft-none")
    assert proxy.requests == 4


def test_attempts_run_out_on_the_last_server_error(api):
    proxy, backend = api
    proxy.add(Fault("status", path=JOBS, status=502, times=0))
    with pytest.raises(SftflowError, match="502"):
        backend.find_job("ft-none")
    assert proxy.requests == 4


def test_no_credential_of_the_base_url_reaches_an_error():
    """A password in the base URL setting (``user:password@``) never reaches the errors the
    flow stores and logs: refused connection, and the API's own refusal (httpx sends the
    userinfo as Basic auth in place of the key: 401)."""
    secret = "pw-4f2a6d"
    with OpenAIContractServer(api_key=KEY) as server:
        up = urlparse(server.base_url)
        for port in (9, up.port):  # nothing listens on 9
            backend = OpenAIBackend(None, f"http://u:{secret}@{up.hostname}:{port}/v1", KEY,
                                    attempts=1, timeout_s=2.0)
            with pytest.raises(SftflowError) as err:
                backend.status("ftjob-1")
            assert f"{up.hostname}:{port}/v1" in str(err.value) and secret not in str(err.value)
