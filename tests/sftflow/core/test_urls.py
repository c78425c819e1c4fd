"""``redact_url``: the one way a URL is made safe to write: no userinfo, no secret-looking
query parameters; everything else of the URL kept as it was."""

from __future__ import annotations

import pytest

from sftflow.core.urls import redact_url


@pytest.mark.parametrize(("url", "safe"), [
    ("http://user:s3cret@ls.example:8080", "http://ls.example:8080"),
    ("http://user:s3cret@ls.example:8080/path/", "http://ls.example:8080/path/"),
    ("https://token-only@mlflow.example/", "https://mlflow.example/"),
    ("http://a%40b:p%3Ass@h", "http://h"),  # percent-encoded userinfo
    ("http://u:p@[::1]:5000/x", "http://[::1]:5000/x"),
    ("postgresql://app:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("databricks://profile:pw@ws", "databricks://ws"),
])
def test_userinfo_is_stripped(url, safe):
    assert redact_url(url) == safe


@pytest.mark.parametrize(("url", "safe"), [
    ("http://h/x?token=abc&page=2", "http://h/x?page=2"),
    ("http://h/x?page=2&api_key=abc", "http://h/x?page=2"),
    ("http://h/x?Password=abc", "http://h/x"),
    ("http://h/x?client_secret=abc&a=1&signature=zz", "http://h/x?a=1"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F&X-Amz-Signature=ff&v=1",
     "https://b.s3.amazonaws.com/k?v=1"),
    ("http://h/x?access_token=t#frag", "http://h/x#frag"),
    ("http://h/cb#access_token=t&state=s", "http://h/cb#state=s"),
    ("http://u:p@h/x?sig=1&token=2&n=3", "http://h/x?n=3"),  # sig: an Azure SAS signature
    ("http://h/x?a=1&&b&X-Goog-Signature=s", "http://h/x?a=1&&b"),
])
def test_secret_looking_query_parameters_are_stripped(url, safe):
    assert redact_url(url) == safe


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:18080",
    "https://api.openai.com/v1",
    "http://h/x?page=2&sort=desc",
    "file:///tmp/mlruns",
    "sqlite:///mlflow.db",
    "databricks",
    "",
    "s3://bucket/datasets/qa/versions/v1/manifest.json",
])
def test_a_url_without_credentials_is_returned_unchanged(url):
    assert redact_url(url) == url


def test_the_secret_never_survives_and_redaction_is_idempotent():
    url = "https://alice:hunter2@ls.example:8443/base?token=hunter2&key=hunter2#x"
    once = redact_url(url)
    assert "hunter2" not in once and "alice" not in once
    assert redact_url(once) == once == "https://ls.example:8443/base#x"


def test_a_url_that_does_not_parse_keeps_no_userinfo_and_no_query():
    assert redact_url("http://u:pw@[::1/x?token=t") == "http://[::1/x"
