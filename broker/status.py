"""``tierq status``: per pool, band and partition, the backlog, the worker that owns the
partition and the age of the oldest waiting request, as Kafka sees them.

Backlog comes from ``broker.backlog.BacklogReader`` (true end offsets, also on Tansu, minus the
committed offsets of the band's consumer group); the owner from DescribeGroups of the pool's
band groups (``tierq-<pool>-<band>``, see ``Topology.band_groups``); the oldest waiting request
is the record at the committed offset, aged by its Kafka timestamp.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from broker.backlog import BacklogError, BacklogReader
from broker.topics import PartitionKey
from schemas.messages import BAND_ORDER
from schemas.settings import Settings
from schemas.topology import Topology


class StatusError(RuntimeError):
    """The status cannot be given: broker unreachable, topics missing, unknown pool."""


@dataclass(frozen=True)
class PartitionStatus:
    pool: str
    band: str
    topic: str
    partition: int
    end: int
    committed: int
    backlog: int
    #: seconds since the oldest waiting request (the record at the committed offset) was written;
    #: None without backlog, or when the record could not be read in time
    oldest_age_s: float | None
    #: the group member holding the partition (``client_id@host``); None when nobody holds it
    #: or the broker does not say (see ``GroupView.note``)
    owner: str | None
    #: the band's consumer group
    group: str
    #: its state (see ``GroupView.state``)
    group_state: str


@dataclass(frozen=True)
class GroupView:
    """What DescribeGroups says about one of a pool's band groups."""

    group_id: str
    #: Stable, PreparingRebalance, CompletingRebalance, Empty, Dead, none (no such group), unknown
    state: str
    members: int
    owners: dict[PartitionKey, str] = field(default_factory=dict)
    #: why owners are missing although the group has members (or could not be described)
    note: str | None = None


@dataclass(frozen=True)
class PoolStatus:
    pool: str
    #: the pool's group name: its band groups are ``<group>-<band>``
    group: str
    #: the band groups, in band order (high first)
    groups: list[GroupView]
    partitions: list[PartitionStatus]


# ---- collecting ---------------------------------------------------------------------------

_STATE_NAMES = {
    ConsumerGroupState.STABLE: "Stable",
    ConsumerGroupState.PREPARING_REBALANCING: "PreparingRebalance",
    ConsumerGroupState.COMPLETING_REBALANCING: "CompletingRebalance",
    ConsumerGroupState.EMPTY: "Empty",
    ConsumerGroupState.DEAD: "Dead",
}


def describe_group(admin: AdminClient, group_id: str, timeout: float = 5.0) -> GroupView:
    """Members of ``group_id`` and the partitions each holds.

    Brokers differ: Kafka answers a group that never existed with state Dead (older versions)
    or GROUP_ID_NOT_FOUND (newer); Tansu 0.6.0 answers Empty for it, and for a live group
    reports the state but no members or assignments, so owners are unknown there.
    """
    try:
        described = admin.describe_consumer_groups([group_id], request_timeout=timeout)[group_id].result()
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() == KafkaError.GROUP_ID_NOT_FOUND:
            return GroupView(group_id, "none", 0)
        reason = error.str() if isinstance(error, KafkaError) else str(exc)
        return GroupView(group_id, "unknown", 0, note=f"cannot describe group {group_id}: {reason}")
    state = _STATE_NAMES.get(described.state, str(described.state).rsplit(".", 1)[-1].title())
    members = list(described.members or [])
    labels = _member_labels(members)
    owners: dict[PartitionKey, str] = {}
    for member in members:
        assignment = member.assignment.topic_partitions if member.assignment else []
        for tp in assignment or []:
            owners[(tp.topic, tp.partition)] = labels[member.member_id]
    note = None
    if state in ("Stable", "CompletingRebalance") and not owners:
        note = ("owners unknown: the broker reported the group without its members' assignments "
                "(Tansu 0.6.0 does; Kafka reports them)")
    elif state == "PreparingRebalance":
        note = "the group is rebalancing: partitions are being reassigned"
    return GroupView(group_id, state, len(members), owners, note)


def _member_labels(members: list) -> dict[str, str]:
    """``client_id@host`` per member id; the member id's tail is added where that is ambiguous
    (two workers with the same client.id on one host)."""
    plain = {m.member_id: f"{m.client_id or '?'}@{(m.host or '?').lstrip('/')}" for m in members}
    counts: dict[str, int] = {}
    for label in plain.values():
        counts[label] = counts.get(label, 0) + 1
    return {mid: label if counts[label] == 1 else f"{label}#{mid[-6:]}" for mid, label in plain.items()}


def check_broker(settings: Settings, topics: Iterable[str], timeout: float) -> None:
    """Raise ``StatusError`` naming the cause when the broker does not answer, or naming every
    missing topic. librdkafka's own log lines are silenced here: the error says it once."""
    errors: list[str] = []
    admin = AdminClient(settings.librdkafka("status-check", log_level=0,
                                            error_cb=lambda error: errors.append(error.str())))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(0)
        cause = errors[-1] if errors else (exc.args[0].str() if exc.args else str(exc))
        raise StatusError(f"cannot reach the Kafka broker at {settings.bootstrap_servers} "
                          f"within {timeout:g}s: {cause}") from None
    missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None]
    if missing:
        raise StatusError(f"topic(s) missing: {', '.join(missing)}; run `tierq topics create`")


def pool_status(settings: Settings, topology: Topology, pool: str, group_id: str, reader: BacklogReader,
                admin: AdminClient, timeout: float = 5.0) -> PoolStatus:
    topics = topology.pool_topics(pool)
    band_of = {topic: band.value for band, topic in topics.items()}
    try:
        loads = reader.read(list(topics.values()), timeout=timeout)
        stamps = reader.oldest_timestamps(loads.values(), timeout=timeout)
    except BacklogError as exc:
        raise StatusError(str(exc)) from None
    groups = {band: describe_group(admin, reader.group_for(topics[band]), timeout) for band in BAND_ORDER}
    now = time.time()
    rows = []
    for band in BAND_ORDER:
        topic, group = topics[band], groups[band]
        for (t, p), load in sorted(loads.items()):
            if t != topic:
                continue
            stamp = stamps.get((t, p))
            age = round(max(0.0, now - stamp), 3) if stamp is not None and load.backlog > 0 else None
            rows.append(PartitionStatus(pool, band_of[t], t, p, load.end, load.committed, load.backlog,
                                        age, group.owners.get((t, p)), group.group_id, group.state))
    return PoolStatus(pool, group_id, list(groups.values()), rows)


def collect(settings: Settings, topology: Topology, pool: str | None = None, group_id: str | None = None,
            timeout: float = 5.0) -> list[PoolStatus]:
    """Status of ``pool`` (default: every pool of the topology). ``group_id`` overrides the
    pool's group name (``tierq-<pool>``, or the workers' TIERQ_GROUP_ID); the band groups are
    ``<group_id>-<band>``."""
    if pool is not None and pool not in topology.pools:
        raise StatusError(f"unknown pool {pool!r} (pools: {', '.join(topology.pools)})")
    pools = [pool] if pool is not None else list(topology.pools)
    if group_id is not None and len(pools) > 1:
        raise StatusError("--group needs --pool: each pool has its own consumer groups")
    check_broker(settings, [t for p in pools for t in topology.pool_topics(p).values()], timeout)
    admin = AdminClient(settings.librdkafka("status"))
    result = []
    for name in pools:
        group = group_id or topology.pool_group(name)
        with BacklogReader(settings, topology.band_groups(name, group)) as reader:
            result.append(pool_status(settings, topology, name, group, reader, admin, timeout))
    return result


# ---- rendering ----------------------------------------------------------------------------

def as_json(pools: list[PoolStatus]) -> str:
    """One JSON object per partition, in pool, band and partition order."""
    rows = [asdict(row) for status in pools for row in status.partitions]
    return json.dumps(rows, indent=2)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def as_table(pools: list[PoolStatus]) -> str:
    """Per pool: one line per partition, a total per band and for the pool."""
    lines: list[str] = []
    for status in pools:
        lines.append(f"pool {status.pool}  (groups {_groups_text(status.group, status.groups)})")
        width = max([len(r.topic) for r in status.partitions] + [len("topic")])
        header = f"{'band':7} {'topic':{width}} {'part':>4} {'backlog':>8} {'oldest':>8}  owner"
        lines.append(header)
        for band in BAND_ORDER:
            rows = [r for r in status.partitions if r.band == band.value]
            for r in rows:
                lines.append(f"{r.band:7} {r.topic:{width}} {r.partition:>4} {r.backlog:>8} "
                             f"{format_age(r.oldest_age_s):>8}  {r.owner or '-'}")
            lines.append(_total_line(band.value, "total", rows, width, _held(rows)))
        lines.append(_total_line("all", "", status.partitions, width, ""))
        for note in dict.fromkeys(g.note for g in status.groups if g.note):
            lines.append(f"note: {note}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _total_line(band: str, label: str, rows: list[PartitionStatus], width: int, owners: str) -> str:
    ages = [r.oldest_age_s for r in rows if r.oldest_age_s is not None]
    backlog = sum(r.backlog for r in rows)
    return (f"{band:7} {label:{width}} {'':>4} {backlog:>8} {format_age(max(ages) if ages else None):>8}"
            f"  {owners}").rstrip()


def _held(rows: list[PartitionStatus]) -> str:
    owners = {r.owner for r in rows if r.owner}
    if not owners:
        return ""
    unheld = sum(1 for r in rows if not r.owner)
    return f"{len(owners)} worker{'s' if len(owners) != 1 else ''}" + (f", {unheld} unheld" if unheld else "")


def _groups_text(name: str, groups: list[GroupView]) -> str:
    """``tierq-default-<band>: Stable, 2 members`` when the band groups agree, else each one's."""
    def text(group: GroupView) -> str:
        members = f", {group.members} member{'s' if group.members != 1 else ''}" if group.members else ""
        return f"{_state_text(group.state)}{members}"

    texts = [text(g) for g in groups]
    if len(set(texts)) == 1:
        return f"{name}-<band>: {texts[0]}"
    return "; ".join(f"{g.group_id}: {t}" for g, t in zip(groups, texts, strict=True))


def _state_text(state: str) -> str:
    if state == "none":
        return "no such group: no worker has joined yet"
    if state in ("Empty", "Dead"):
        return f"{state}: no worker running"
    return state
