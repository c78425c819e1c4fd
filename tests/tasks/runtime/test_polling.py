"""The one retry helper, the one wait and the one retry predicate: pure, no services."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from label_studio_sdk.core.api_error import ApiError

from sftflow.core.errors import ConfigError, SftflowError
from sftflow.tasks.runtime.polling import Backoff, is_transient, retry, wait_until


class Clock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, s: float) -> None:
        self.slept.append(s)


def _client_error(status: int) -> ClientError:
    return ClientError({"Error": {"Code": str(status)},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(("err", "transient"), [
    (SftflowError("checksum mismatch"), False),
    (ConfigError("no such project"), False),
    (FileNotFoundError("gone"), False),
    (_client_error(403), False),
    (_client_error(404), False),
    (_client_error(503), True),
    (ApiError(status_code=400, body="bad"), False),
    (ApiError(status_code=429, body="slow down"), True),
    (ApiError(status_code=502, body="proxy"), True),
    (TimeoutError("read timed out"), True),
    (ConnectionResetError(), True),
])
def test_is_transient(err, transient):
    assert is_transient(err) is transient


def test_retry_retries_transient_errors_then_succeeds():
    clock, calls = Clock(), []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("timed out")
        return "ok"

    assert retry(flaky, attempts=5, backoff=Backoff(0.1, 1.0), sleep=clock.sleep) == "ok"
    assert len(calls) == 3 and len(clock.slept) == 2
    assert all(0.1 <= s <= 1.0 for s in clock.slept)


def test_retry_gives_up_at_once_on_a_final_error_and_after_the_last_attempt():
    clock = Clock()
    with pytest.raises(ConfigError):
        retry(lambda: (_ for _ in ()).throw(ConfigError("bad")), attempts=5, sleep=clock.sleep)
    assert clock.slept == []
    with pytest.raises(TimeoutError):
        retry(lambda: (_ for _ in ()).throw(TimeoutError()), attempts=3, sleep=clock.sleep)
    assert len(clock.slept) == 2


def test_wait_until_returns_the_first_truthy_value_or_the_last_at_the_deadline():
    clock, values = Clock(), iter([0, 0, 7])
    assert wait_until(lambda: next(values), timeout_s=60, sleep=clock.sleep) == 7
    assert len(clock.slept) == 2
    assert wait_until(lambda: 0, timeout_s=0.05, backoff=Backoff(0.01, 0.02)) == 0
