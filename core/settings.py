"""Service settings, read once from `SEALER_*` environment variables.

The defaults are the embedded mode: a SQLite database, a kombu SQLAlchemy broker and a
local object store, all under one data folder. Production sets the database, broker and
S3 variables instead. This module must not import torch: the API image has none.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the API, the worker and the CLI."""

    model_config = SettingsConfigDict(env_prefix="SEALER_", extra="ignore")

    data_dir: Path = Field(default=Path(".data"), description="Root of every embedded-mode file.")

    # Database and broker. Empty means the embedded default under data_dir.
    database_url: str = ""
    broker_url: str = ""
    broker_visibility_timeout_s: int = Field(default=3600, ge=1)

    # Object store.
    storage: Literal["local", "s3"] = "local"
    s3_endpoint_url: str = ""
    s3_public_endpoint_url: str = Field(
        default="",
        description="Endpoint that clients use for presigned URLs when it differs from the API's own "
        "(for example http://localhost:9000 while the API reaches http://minio:9000); empty: s3_endpoint_url.",
    )
    s3_bucket: str = "sealer"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    s3_max_attempts: int = Field(default=8, ge=1)
    presigned_url_ttl_s: int = Field(default=300, ge=1, le=7 * 24 * 3600)

    # Uploads and input safety.
    max_upload_bytes: int = Field(default=20 * 1024**3, ge=1)
    max_archive_members: int = Field(default=10_000, ge=1)
    max_archive_bytes: int = Field(default=40 * 1024**3, ge=1)
    max_archive_ratio: float = Field(default=200.0, gt=1)
    max_safetensors_header_bytes: int = Field(default=100 * 1024**2, ge=1)

    # Worker.
    worker_id: str = ""
    scratch_dir: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lease_ttl_s: int = Field(default=60, ge=2)
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    reaper_interval_s: float = Field(default=15.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    checkpoint_every_steps: int = Field(default=50, ge=1)
    job_time_limit_s: int = Field(default=24 * 3600, ge=1)
    store_retry_window_s: int = Field(
        default=300,
        ge=0,
        description="Seconds the worker keeps retrying the object store through an outage, with exponential "
        "backoff, before it fails the job with `storage_unavailable`.",
    )
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)

    # API.
    api_workers: int = Field(default=1, ge=1)
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    # Optional local evaluators. Nothing is downloaded: each is a path on disk or unset.
    clip_model_path: Path | None = None
    classifier_path: Path | None = None

    @model_validator(mode="after")
    def _check_s3(self) -> "Settings":
        if self.storage == "s3" and not self.s3_endpoint_url and not self.s3_region:
            raise ValueError("SEALER_STORAGE=s3 needs SEALER_S3_ENDPOINT_URL or SEALER_S3_REGION")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'sealer.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def local_store_dir(self) -> Path:
        return self.data_dir / "objects"

    @property
    def resolved_scratch_dir(self) -> Path:
        return self.scratch_dir or self.data_dir / "scratch"

    @property
    def lab_cache_dir(self) -> Path:
        return self.data_dir / "lab-cache"


@lru_cache
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    return Settings()
