"""The one settings object: sources, nesting, and secrets that never show."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sftflow.core.settings import Settings


def test_env_prefix_and_nesting(monkeypatch):
    monkeypatch.setenv("SFTFLOW_S3__BUCKET", "from-env")
    monkeypatch.setenv("SFTFLOW_LABELSTUDIO__URL", "http://ls.example:8080")
    monkeypatch.setenv("SFTFLOW_STACK__S3_PORT", "28333")
    s = Settings()
    assert s.s3.bucket == "from-env"
    assert s.labelstudio.url == "http://ls.example:8080"
    assert s.stack.s3_port == 28333


def test_toml_file_below_env(tmp_path, monkeypatch):
    cfg = tmp_path / "sftflow.toml"
    cfg.write_text('[s3]\nbucket = "from-file"\nregion = "eu-west-1"\n')
    monkeypatch.setenv("SFTFLOW_CONFIG", str(cfg))
    monkeypatch.setenv("SFTFLOW_S3__REGION", "us-west-2")
    s = Settings()
    assert s.s3.bucket == "from-file"  # file fills what env does not set
    assert s.s3.region == "us-west-2"  # env wins over the file


def test_secrets_are_redacted_everywhere(monkeypatch):
    monkeypatch.setenv("SFTFLOW_S3__SECRET_ACCESS_KEY", "very-secret-s3")
    monkeypatch.setenv("SFTFLOW_LABELSTUDIO__API_KEY", "very-secret-token")
    s = Settings()
    dumped = json.dumps(s.redacted())
    for text in (dumped, repr(s), str(s)):
        assert "very-secret-s3" not in text and "very-secret-token" not in text
    assert s.s3.secret_access_key.get_secret_value() == "very-secret-s3"


def test_credentials_in_url_settings_are_redacted(monkeypatch):
    monkeypatch.setenv("SFTFLOW_LABELSTUDIO__URL", "http://ann:pw-url-secret@ls.example:8080")
    monkeypatch.setenv("SFTFLOW_MLFLOW__TRACKING_URI", "https://ml.example/?token=tok-url-secret")
    monkeypatch.setenv("SFTFLOW_FINETUNE__OPENAI_BASE_URL", "https://u:pw-url-secret@api.example/v1")
    s = Settings()
    dumped = s.redacted()
    assert "url-secret" not in json.dumps(dumped)
    assert dumped["labelstudio"]["url"] == "http://ls.example:8080"
    assert dumped["mlflow"]["tracking_uri"] == "https://ml.example/"
    assert dumped["finetune"]["openai_base_url"] == "https://api.example/v1"
    assert s.labelstudio.url == "http://ann:pw-url-secret@ls.example:8080"  # the setting itself


def test_the_bridge_refuses_the_default_secret_beyond_loopback():
    import pytest

    from sftflow.core.errors import ConfigError
    from sftflow.core.settings import LOCAL_WEBHOOK_SECRET, WebhookSettings

    hooks = WebhookSettings()
    for host in ("127.0.0.1", "::1", "localhost"):
        hooks.check_bind(host, LOCAL_WEBHOOK_SECRET)  # loopback: the local stack's default is fine
    hooks.check_bind("0.0.0.0", "a-secret-of-our-own")
    for secret, said in ((LOCAL_WEBHOOK_SECRET, "the default secret"), (None, "no secret")):
        with pytest.raises(ConfigError, match=f"listen on 0.0.0.0, beyond loopback, with {said}"):
            hooks.check_bind("0.0.0.0", secret)


def test_the_lock_lease_is_a_setting_with_a_one_second_floor(monkeypatch):
    assert Settings().locks.lease_s == 60.0
    monkeypatch.setenv("SFTFLOW_LOCKS__LEASE_S", "10")
    assert Settings().locks.lease_s == 10.0
    monkeypatch.setenv("SFTFLOW_LOCKS__LEASE_S", "0.5")  # renewal every 0.17 s: refused
    with pytest.raises(ValidationError, match="lease_s"):
        Settings()
