"""The one settings object of sftflow.

Values come, highest priority first, from: keyword arguments, environment variables with the
prefix ``SFTFLOW_`` (nested with ``__``, e.g. ``SFTFLOW_S3__ENDPOINT_URL``), a ``.env`` file,
and an optional TOML file named by ``SFTFLOW_CONFIG`` (default ``sftflow.toml`` if present).

The defaults point at the local stack (``sftflow stack up``), whose credentials are local-only
and generated for loopback use. Secrets are ``SecretStr``; they may instead name a Prefect
Secret block (``*_block`` fields), resolved when a client is built.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sftflow.core.errors import ConfigError
from sftflow.core.urls import redact_url

# Credentials of the local stack only. They never leave loopback.
LOCAL_S3_ACCESS_KEY = "sftflow-local"
LOCAL_S3_SECRET_KEY = "sftflow-local-secret-key"
LOCAL_LS_TOKEN = "sftflowlocaltoken0000000000000000000001"  # <= 40 chars (LS limit)
LOCAL_WEBHOOK_SECRET = "sftflow-local-webhook-secret"
LOCAL_PG_PASSWORD = "sftflow-local-postgres"


class S3Settings(BaseModel):
    endpoint_url: str | None = Field(
        "http://127.0.0.1:18333",
        description="S3 endpoint; empty for AWS S3 itself.",
    )
    region: str = Field("us-east-1", description="S3 region.")
    access_key_id: SecretStr | None = Field(
        SecretStr(LOCAL_S3_ACCESS_KEY), description="Access key id; empty to use boto3's chain."
    )
    secret_access_key: SecretStr | None = Field(
        SecretStr(LOCAL_S3_SECRET_KEY), description="Secret access key."
    )
    secret_access_key_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the secret access key."
    )
    credentials_block: str | None = Field(
        None, description="Name of a prefect-aws AwsCredentials block (needs the `aws` extra): "
        "its keys, session token, profile or assumed role, region and endpoint_url (client "
        "parameters) replace the key pair, region and endpoint above.",
    )
    bucket: str = Field("sftflow", description="Default bucket for prompts, datasets and models.")
    max_attempts: int = Field(
        6, ge=0, description="botocore retries after the first attempt (adaptive mode)."
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)


class LabelStudioSettings(BaseModel):
    url: str = Field("http://127.0.0.1:18080", description="Label Studio base URL.")
    api_key: SecretStr | None = Field(
        SecretStr(LOCAL_LS_TOKEN),
        description="Legacy API token or personal access token (JWT refresh token).",
    )
    api_key_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the API key."
    )
    timeout_s: float = Field(120.0, gt=0, description="HTTP timeout per request.")


class PrefectSettings(BaseModel):
    api_url: str = Field(
        "http://127.0.0.1:14200/api", description="Prefect API URL of the local stack's server."
    )
    heartbeat_s: int = Field(
        30, ge=30, description="Seconds between the heartbeats of sftflow's flow runs "
        "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY of their processes; Prefect's minimum is 30). The "
        "zombie automation marks a run CRASHED after 3 x this without one (a killed process).",
    )


class DatasetSettings(BaseModel):
    prefix: str = Field("datasets", description="Key prefix of dataset versions in the bucket.")
    shard_rows: int = Field(5000, ge=1, description="Rows per content-addressed Parquet shard.")
    full_every: int = Field(
        20, ge=1, description="Every N-th build of a dataset reads the whole project (a full "
        "export snapshot) even when the incremental export reconciles: a periodic check.")
    license: str = Field(
        "other", description="License id of the Hub dataset card `sftflow datasets pull` writes "
        "(an HF id such as cc-by-4.0 or apache-2.0; 'other': none declared).",
    )
    gc_min_age_floor_s: float = Field(
        3600.0, ge=0, description="Retention floor of `sftflow datasets gc`: it refuses a "
        "--min-age-s below this (an unreferenced object younger than it may belong to a build "
        "in progress). Lower it only deliberately (tests, soak runs).",
    )


class FinetuneSettings(BaseModel):
    backend: Literal["trl", "openai"] = "trl"
    models_prefix: str = Field("models", description="Key prefix of model lineage manifests.")
    openai_base_url: str = Field("https://api.openai.com/v1")
    openai_api_key: SecretStr | None = None
    openai_api_key_block: str | None = None
    trl_mode: Literal["deployment", "local"] = Field(
        "deployment",
        description="deployment: run the train-trl flow on a work pool (needs a worker); "
        "local: train inside the orchestrating process (demo, no worker).",
    )
    trl_deployment: str = Field(
        "train-trl/default", description="FLOW/DEPLOYMENT name of the training flow's deployment."
    )
    train_work_pool: str = Field("sftflow-train", description="Work pool of the training deployment.")
    few_shot_k: int = Field(
        3, ge=0, description="Eval gate (trl): the base model prompted with this many train rows is "
        "the baseline a fine-tune must beat to be promoted; 0: no few-shot baseline.")
    few_shot_seed: int = Field(0, description="Chooses the few-shot rows (recorded in the lineage).")


class MlflowSettings(BaseModel):
    """Optional experiment tracking: each fine-tune job becomes one MLflow run."""

    tracking_uri: str = Field(
        "", description="MLflow tracking URI (http(s)://server, file:/path, databricks); "
        "empty: no tracking.")
    experiment: str = Field("sftflow", description="MLflow experiment the runs go to.")
    deadline_s: float = Field(
        30.0, gt=0, description="How long a job waits for an unreachable tracking server before "
        "it records the tracking error (MLflow's own client would retry for minutes).")


class DraftSettings(BaseModel):
    """Model drafts for annotators through an OpenAI-compatible chat endpoint (vLLM, TGI, hosted)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="Chat endpoint base URL (.../v1).")
    api_key: SecretStr | None = Field(None, description="Bearer key; empty for a server without one.")
    model: str | None = Field(None, description="Served model name (empty: the job's fine_tuned_model).")
    max_new_tokens: int = Field(512, ge=1, description="Longest draft, in tokens.")
    batch_size: int = Field(8, ge=1, description="Prompts generated per batch (and per Prefect task).")


class LockSettings(BaseModel):
    """The leased lock records in S3 (``tasks/versions/locks.py``): ingest per project, build per dataset."""

    lease_s: float = Field(
        60.0, ge=1,
        description="Lease of a lock record. The live holder renews it every third of the lease, "
        "so it is never overtaken while it can reach S3; a killed holder's lock is taken over "
        "this long after its last renewal. Shorter: faster recovery after a crash, more renewal "
        "writes; keep it well above the slowest S3 write.",
    )


class WebhookSettings(BaseModel):
    """The event bridge (``sftflow webhooks serve``): Label Studio and S3 notifications in."""

    host: str = "127.0.0.1"
    port: int = 18700
    secret: SecretStr | None = Field(
        SecretStr(LOCAL_WEBHOOK_SECRET),
        description="Shared secret expected in the X-Sftflow-Secret header.",
    )
    secret_block: str | None = Field(None, description="Prefect Secret block with the secret.")
    max_body_bytes: int = Field(1_000_000, gt=0, description="Larger bodies get 413.")

    def check_bind(self, host: str, secret: str | None) -> None:
        """Refuse to serve beyond loopback with no secret or with the repository's default one
        (anyone could read it here and trigger builds and fine-tunes)."""
        import ipaddress

        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return
        if not secret or secret == LOCAL_WEBHOOK_SECRET:
            raise ConfigError(
                f"the webhook bridge would listen on {host}, beyond loopback, with "
                f"{'no secret' if not secret else 'the default secret from the repository'}; "
                "set SFTFLOW_WEBHOOKS__SECRET (or __SECRET_BLOCK) to a secret of your own"
            )


class StackSettings(BaseModel):
    """Where and on which loopback ports the local stack runs."""

    dir: Path = Field(Path(".stack"), description="Data, logs and pid files of the local stack.")
    host: str = "127.0.0.1"
    s3_port: int = 18333
    weed_master_port: int = 19333
    weed_volume_port: int = 18081
    weed_filer_port: int = 18889
    label_studio_port: int = 18080
    prefect_port: int = 14200
    label_studio_bin: Path = Field(
        Path(".venv-labelstudio/bin/label-studio"),
        description="label-studio executable (its own virtual environment).",
    )
    label_studio_user: str = "admin@sftflow.local"
    label_studio_password: SecretStr = SecretStr("sftflow-local-admin")
    health_timeout_s: float = Field(120.0, gt=0)
    postgres: bool = Field(
        False,
        description="Run Label Studio and the Prefect server on PostgreSQL (a `postgres` service "
        "of the stack) instead of SQLite, as production does.",
    )
    prefect_sqlite_immediate: bool = Field(
        True,
        description="On SQLite, start the Prefect server with every database transaction BEGIN "
        "IMMEDIATE (Prefect's deferred ones fail with 'database is locked' under concurrent "
        "runs); false runs `prefect server start` as shipped.",
    )
    templates: bool = Field(
        True,
        description="Start a new SQLite stack's Label Studio and Prefect databases from migrated "
        "templates (made once per installed version) instead of migrating each one "
        "(infra/templates.py).",
    )
    template_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "sftflow" / "templates",
        description="Where the migrated database templates are kept.",
    )
    postgres_port: int = 15432
    postgres_password: SecretStr = Field(
        SecretStr(LOCAL_PG_PASSWORD), description="Password of the local `sftflow` role."
    )
    postgres_bin_dir: Path = Field(
        Path("/usr/lib/postgresql/15/bin"),
        description="PostgreSQL server binaries (initdb, postgres, psql): Debian's postgresql-15.",
    )


def _config_file() -> Path:
    return Path(os.environ.get("SFTFLOW_CONFIG", "sftflow.toml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SFTFLOW_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    s3: S3Settings = S3Settings()
    labelstudio: LabelStudioSettings = LabelStudioSettings()
    prefect: PrefectSettings = PrefectSettings()
    datasets: DatasetSettings = DatasetSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    webhooks: WebhookSettings = WebhookSettings()
    drafts: DraftSettings = DraftSettings()
    mlflow: MlflowSettings = MlflowSettings()
    locks: LockSettings = LockSettings()
    stack: StackSettings = StackSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings]
        if _config_file().is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_config_file()))
        return tuple(sources)

    def with_bucket(self, bucket: str | None) -> Settings:
        """These settings with another default bucket (``None`` or empty: unchanged)."""
        if not bucket or bucket == self.s3.bucket:
            return self
        return self.model_copy(update={"s3": self.s3.model_copy(update={"bucket": bucket})})

    def redacted(self) -> dict:
        """The settings as JSON-able data with every secret replaced by ``'**********'`` and
        every URL without credentials (``redact_url``)."""
        return _without_url_credentials(self.model_dump(mode="json"))


def _without_url_credentials(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_url_credentials(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_without_url_credentials(v) for v in data]
    return redact_url(data) if isinstance(data, str) and "://" in data else data


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def resolve_secret(value: SecretStr | None, block: str | None) -> str | None:
    """The secret's plain value, from a Prefect Secret block when one is named."""
    if block:
        from prefect.blocks.system import Secret

        return Secret.load(block).get()
    return value.get_secret_value() if value is not None else None
