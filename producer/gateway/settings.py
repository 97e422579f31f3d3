"""Gateway settings (``TIERQ_GATEWAY_*`` besides the shared ``TIERQ_*`` ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.messages import Band
from schemas.settings import Settings


class GatewaySettings(Settings):
    model_config = SettingsConfigDict(
        env_prefix="TIERQ_", env_file=".env", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    gateway_host: str = Field(default="127.0.0.1", description="listen address (0.0.0.0 in a container)")
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    gateway_timeout_s: float = Field(
        default=300.0, gt=0, description="default wait for a reply; also the request's deadline in the worker")
    gateway_max_timeout_s: float = Field(default=3600.0, gt=0, description="largest X-Request-Timeout a client may ask")
    gateway_default_priority: Band = Field(
        default=Band.medium, description="priority when a request names none (capped at the tenant's maximum)")
    gateway_batch_priority: Band = Field(default=Band.low, description="priority of batch-API requests")
    gateway_replay: Literal["beginning", "end"] = Field(
        default="beginning",
        description="where the reply consumer starts: 'beginning' rebuilds results and batches after a restart")
    gateway_results_cache: int = Field(default=100_000, ge=100, description="replies kept for GET /v1/requests/{id}")
    gateway_batch_dir: Path | None = Field(default=None, description="batch files and state (default <state_dir>/batches)")
    gateway_model_name: str = Field(default="tierq", description="`model` in responses when the request names none")

    @property
    def batch_dir(self) -> Path:
        return self.gateway_batch_dir or self.state_dir / "batches"
