"""Runtime settings from ``TIERQ_*`` environment variables and an optional ``.env`` file.

Read once at the edge (the CLI) and passed down; library code never reads the environment.
Nested groups use ``__``: ``TIERQ_SECURITY__SASL_USERNAME=...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.lanes import READ_AHEAD_PER_PARTITION
from schemas.tenants import load_topology
from schemas.topology import Topology


class BrokerNotConfigured(RuntimeError):
    """No bootstrap servers were given where a running broker is required."""


class KafkaSecurity(BaseModel):
    """Security settings passed through to librdkafka unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None

    def as_librdkafka_dict(self) -> dict[str, str]:
        conf: dict[str, str] = {"security.protocol": self.protocol}
        optional: dict[str, Any] = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password,
        }
        for key, value in optional.items():
            if value is None:
                continue
            conf[key] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return conf


class Settings(BaseSettings):
    """Settings shared by every tierq command."""

    model_config = SettingsConfigDict(
        env_prefix="TIERQ_",
        env_file=".env",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    bootstrap_servers: str | None = Field(default=None, description="Kafka bootstrap servers, host:port[,host:port]")
    topics_file: Path = Field(default=Path("topics.yaml"), description="Topology file")
    tenants_file: Path = Field(
        default=Path("tenants.yaml"), description="Tenants and API key hashes written by `tierq tenant` (read if present)"
    )
    client_id: str = Field(default="tierq", description="Kafka client.id prefix")
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)
    kafka_extra: dict[str, str] = Field(
        default_factory=dict, description="Extra librdkafka properties, as JSON: TIERQ_KAFKA_EXTRA='{\"k\": \"v\"}'"
    )
    state_dir: Path = Field(default=Path(".tierq"), description="Local state: generated test model, broker logs")
    read_ahead_per_partition: int = Field(
        default=READ_AHEAD_PER_PARTITION, ge=1,
        description="the pool's read-ahead: buffered requests per source partition at most in a worker (read "
                    "past a flood to the requests of other tenants behind it, so the fair share sees them); "
                    "producers route by the backlog beyond it, so give every process of a pool the same value")
    quota_redis_url: SecretStr | None = Field(
        default=None,
        description="redis://[:password@]host:port/db (rediss://, unix:// too): tenants' requests/s and tokens/min "
        "buckets shared in Redis/Valkey by every producer and gateway; unset: buckets per process",
    )
    quota_redis_on_error: Literal["local", "refuse"] = Field(
        default="local",
        description="Redis unreachable: 'local' enforces quotas per process (logged) until it is back; "
        "'refuse' refuses rate-limited requests (quota_exceeded, HTTP 429)",
    )

    @field_validator("quota_redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str) or not raw.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://host:port/db, rediss://... or unix://... URL")
        return raw

    def load_topology(self) -> Topology:
        """topics.yaml plus the tenants file, validated."""
        return load_topology(self.topics_file, self.tenants_file)

    def require_bootstrap(self) -> str:
        if not self.bootstrap_servers:
            raise BrokerNotConfigured(
                "no Kafka broker configured: set TIERQ_BOOTSTRAP_SERVERS or pass --bootstrap "
                "(for a local broker, run `tierq broker` in another terminal)"
            )
        return self.bootstrap_servers

    def librdkafka(self, role: str, **overrides: Any) -> dict[str, Any]:
        """librdkafka config for a client of ``role`` (producer, consumer, admin)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.require_bootstrap(),
            "client.id": f"{self.client_id}-{role}",
        }
        conf.update(self.security.as_librdkafka_dict())
        conf.update(self.kafka_extra)
        conf.update(overrides)
        return conf
