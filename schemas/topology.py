"""The topology in topics.yaml: bands, pools, topics, reply/DLQ topics and tenants.

Loading validates every cross reference (a tenant's pool exists, no topic is used twice,
every band is configured) and fails fast with the file and the key named, because a
typo here would otherwise surface much later as requests that nobody consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from schemas.lanes import DEFAULT_LANE_SHARE, HIGH_LANE_SHARE, tenant_lanes
from schemas.messages import BAND_ORDER, Band, PoolName, TenantId

TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,249}$")]


class TopologyError(ValueError):
    """topics.yaml is missing, unreadable or inconsistent; the message names file and key."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BandConfig(_Config):
    partitions: int = Field(default=3, ge=1, le=10_000)
    aging_step_s: float | None = Field(default=None, gt=0)
    reserved_slots: int = Field(default=0, ge=0)
    #: share of the partitions a tenant's requests spread over (schemas.lanes); null: every
    #: partition for high, 3/4 for medium and low
    lane_share: float | None = Field(default=None, gt=0, le=1)


class PoolConfig(_Config):
    description: str = ""
    model: str | None = None
    topics: dict[Band, TopicName] | None = None


class RepliesConfig(_Config):
    topic_pattern: str = "tierq.replies.{tenant_id}"
    partitions: int = Field(default=3, ge=1)
    retention_ms: int | None = Field(default=None, ge=1)


class DlqConfig(_Config):
    topic: TopicName = "tierq.dlq"
    partitions: int = Field(default=1, ge=1)


class ControlConfig(_Config):
    """Each pool's control topic: cancel records (tierq.cancel/v1), read by every worker of the pool."""

    topic_pattern: str = "tierq.{pool}.control"
    partitions: int = Field(default=1, ge=1)
    retention_ms: int | None = Field(default=3_600_000, ge=1)


class AttemptsConfig(_Config):
    topic: TopicName = "tierq.attempts"
    partitions: int = Field(default=3, ge=1)


class Quotas(_Config):
    """Per-tenant limits; ``None`` means unlimited."""

    requests_per_s: float | None = Field(default=None, gt=0)
    tokens_per_min: int | None = Field(default=None, ge=1)
    max_in_flight: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)


ApiKeyHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class TenantConfig(_Config):
    pool: PoolName = "default"
    max_priority: Band = Band.high
    on_priority_above_max: Literal["reject", "lower"] = "reject"
    api_key_hashes: list[ApiKeyHash] = Field(default_factory=list)
    quotas: Quotas = Field(default_factory=Quotas)
    #: partitions per band this tenant's requests are spread over (schemas.lanes); null: the band's
    #: ``lane_share`` of its partitions
    lanes: int | None = Field(default=None, ge=1)


class DeviceMatch(_Config):
    """Which devices a rule applies to; every field given must match (none given: all)."""

    kind: Literal["gpu", "mig", "cpu"] | None = None
    label: str | None = None  # gpu0, gpu1-mig2, cpu0 (as `tierq devices` prints)
    uuid: str | None = None
    profile: str | None = None  # MIG profile, e.g. 3g.40gb
    name_contains: str | None = None


class DeviceRule(_Config):
    """What the worker on a matching device serves and how its engine is sized."""

    match: DeviceMatch = Field(default_factory=DeviceMatch)
    pool: PoolName = "default"
    enabled: bool = True  # false: start no worker on matching devices
    model: str | None = None
    max_num_seqs: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    engine_extra: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partitions and topic-level configs."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


class Topology(_Config):
    version: Literal[1] = 1
    bands: dict[Band, BandConfig]
    topic_pattern: str = "tierq.{pool}.{band}"
    replication_factor: int = Field(default=1, ge=1)
    pools: dict[PoolName, PoolConfig] = Field(min_length=1)
    replies: RepliesConfig = Field(default_factory=RepliesConfig)
    dlq: DlqConfig = Field(default_factory=DlqConfig)
    attempts: AttemptsConfig = Field(default_factory=AttemptsConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    tenants: dict[TenantId, TenantConfig] = Field(default_factory=dict)
    #: device -> pool rules for `tierq workers up`, first match wins (default: the default pool)
    devices: list[DeviceRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_references(self) -> Topology:
        missing = [b.value for b in BAND_ORDER if b not in self.bands]
        if missing:
            raise ValueError(f"bands: missing band(s) {', '.join(missing)}; all of high, medium, low are required")
        if self.bands[Band.high].aging_step_s is not None:
            raise ValueError("bands.high.aging_step_s: high is the top band and cannot be promoted; use null")
        if "{pool}" not in self.control.topic_pattern:
            raise ValueError("control.topic_pattern: must contain '{pool}'")
        if "{tenant_id}" not in self.replies.topic_pattern:
            raise ValueError("replies.topic_pattern: must contain '{tenant_id}'")
        for tenant_id, tenant in self.tenants.items():
            if tenant.pool not in self.pools:
                raise ValueError(
                    f"tenants.{tenant_id}.pool: unknown pool {tenant.pool!r} (pools: {', '.join(self.pools)})"
                )
        for i, rule in enumerate(self.devices):
            if rule.pool not in self.pools:
                raise ValueError(f"devices.{i}.pool: unknown pool {rule.pool!r} (pools: {', '.join(self.pools)})")
        self._check_topic_names()
        return self

    def _check_topic_names(self) -> None:
        seen: dict[str, str] = {}
        for key, topic in self._named_topics():
            if not is_valid_topic_name(topic):
                raise ValueError(f"{key}: {topic!r} is not a valid Kafka topic name")
            if topic in seen:
                raise ValueError(f"{key}: topic {topic!r} is already used by {seen[topic]}")
            seen[topic] = key

    def _named_topics(self) -> list[tuple[str, str]]:
        named = []
        for pool in self.pools:
            for band, topic in self.pool_topics(pool).items():
                named.append((f"pools.{pool}.topics.{band.value}", topic))
            named.append((f"control (pool {pool})", self.control_topic(pool)))
        for tenant_id in self.tenants:
            named.append((f"replies (tenant {tenant_id})", self.reply_topic(tenant_id)))
        named.append(("dlq.topic", self.dlq.topic))
        named.append(("attempts.topic", self.attempts.topic))
        return named

    def with_topic_prefix(self, prefix: str) -> Topology:
        """The same topology with every topic name under ``prefix`` (separate test/bench runs)."""
        document = self.model_dump(mode="json")
        document["topic_pattern"] = f"{prefix}.{{pool}}.{{band}}"
        document["replies"]["topic_pattern"] = f"{prefix}.replies.{{tenant_id}}"
        document["dlq"]["topic"] = f"{prefix}.dlq"
        document["attempts"]["topic"] = f"{prefix}.attempts"
        document["control"]["topic_pattern"] = f"{prefix}.{{pool}}.control"
        return Topology.model_validate(document)

    def band_topic(self, pool: str, band: Band) -> str:
        configured = self.pools[pool].topics or {}
        return configured.get(band) or self.topic_pattern.format(pool=pool, band=band.value)

    def pool_topics(self, pool: str) -> dict[Band, str]:
        return {band: self.band_topic(pool, band) for band in BAND_ORDER}

    def tenant_lanes(self, tenant_id: str, band: Band, topic: str, partitions: int) -> list[int]:
        """The partitions of ``topic`` (band ``band``, ``partitions`` of them) that the tenant's
        requests go to: its configured ``lanes``, else the band's ``lane_share`` (schemas.lanes)."""
        tenant = self.tenants.get(tenant_id)
        share = self.bands[band].lane_share
        if share is None:
            share = HIGH_LANE_SHARE if band is Band.high else DEFAULT_LANE_SHARE
        return tenant_lanes(tenant_id, topic, partitions, tenant.lanes if tenant else None, share)

    @staticmethod
    def pool_group(pool: str) -> str:
        """The pool's group name (``tierq-<pool>``; workers may set another, TIERQ_GROUP_ID)."""
        return f"tierq-{pool}"

    def band_groups(self, pool: str, group: str | None = None) -> dict[str, str]:
        """The consumer group of each band topic of ``pool``, by topic: ``<group>-<band>``.

        One group per band, not one for the pool: a group balances only the *number* of
        partitions per member across its topics (cooperative-sticky), so a worker joining a
        one-group pool could take every high partition and no low one. With a group per band,
        every band is spread over every worker."""
        base = group or self.pool_group(pool)
        return {topic: f"{base}-{band.value}" for band, topic in self.pool_topics(pool).items()}

    def control_topic(self, pool: str) -> str:
        return self.control.topic_pattern.format(pool=pool)

    def reply_topic(self, tenant_id: str) -> str:
        return self.replies.topic_pattern.format(tenant_id=tenant_id)

    def topic_specs(self) -> list[TopicSpec]:
        """Every topic the topology needs, in a stable order."""
        specs = []
        for pool in self.pools:
            for band, topic in self.pool_topics(pool).items():
                specs.append(TopicSpec(topic, self.bands[band].partitions))
            control_config = {} if self.control.retention_ms is None else {"retention.ms": str(self.control.retention_ms)}
            specs.append(TopicSpec(self.control_topic(pool), self.control.partitions, control_config))
        reply_config = {}
        if self.replies.retention_ms is not None:
            reply_config["retention.ms"] = str(self.replies.retention_ms)
        for tenant_id in self.tenants:
            specs.append(TopicSpec(self.reply_topic(tenant_id), self.replies.partitions, dict(reply_config)))
        specs.append(TopicSpec(self.dlq.topic, self.dlq.partitions))
        specs.append(TopicSpec(self.attempts.topic, self.attempts.partitions, {"cleanup.policy": "compact"}))
        return specs


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def is_valid_topic_name(name: str) -> bool:
    """Kafka's rule for topic names: 1-249 of ``[A-Za-z0-9._-]``, not '.' or '..'."""
    return 0 < len(name) <= 249 and name not in (".", "..") and set(name) <= _TOPIC_CHARS


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per error, ``dotted.key: message``."""
    lines = []
    for err in exc.errors(include_url=False, include_context=False):
        where = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n  ".join(lines)


def parse_topology(document: object, source: str = "<topology>") -> Topology:
    if not isinstance(document, dict):
        raise TopologyError(f"{source}: expected a mapping at the top level, got {type(document).__name__}")
    try:
        return Topology.model_validate(document)
    except ValidationError as exc:
        raise TopologyError(f"{source}: invalid topology:\n  {describe_validation_error(exc)}") from None


def read_topology_file(path: str | Path) -> Topology:
    """Read and validate a topics.yaml file alone (``schemas.tenants.load_topology`` adds the
    tenants file). Raises ``TopologyError`` naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"{path}: topics file not found (set TIERQ_TOPICS_FILE or --topics)") from None
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read topics file: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from None
    return parse_topology(document, str(path))
