"""Topic administration: create what topics.yaml describes, idempotently."""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from schemas.settings import Settings
from schemas.topology import Topology


#: A partition as (topic, partition): the key of every per-partition table in tierq.
PartitionKey = tuple[str, int]


class TopicCreationError(RuntimeError):
    pass


def create_topics(settings: Settings, topology: Topology, timeout: float = 30.0) -> dict[str, str]:
    """Create every topic of ``topology``; return ``{topic: "created" | "exists"}``.

    Existing topics are left alone (their partition count is not changed: ``grow_topics``
    does that); any other failure raises ``TopicCreationError`` naming each failed topic.
    """
    admin = AdminClient(settings.librdkafka("admin"))
    specs = topology.topic_specs()
    new_topics = [
        NewTopic(spec.name, num_partitions=spec.partitions, replication_factor=topology.replication_factor,
                 config=spec.config)
        for spec in specs
    ]
    futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
    outcome: dict[str, str] = {}
    failures: list[str] = []
    for spec in specs:
        try:
            futures[spec.name].result(timeout=timeout)
            outcome[spec.name] = "created"
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                outcome[spec.name] = "exists"
            else:
                failures.append(f"{spec.name}: {error.str()}")
    if failures:
        raise TopicCreationError("could not create topics:\n  " + "\n  ".join(failures))
    return outcome


def wait_for_topics(settings: Settings, topics: list[str], timeout: float = 30.0) -> None:
    """Block until the broker's metadata lists every topic (creation is asynchronous)."""
    admin = AdminClient(settings.librdkafka("admin"))
    deadline = time.monotonic() + timeout
    missing = set(topics)
    while missing and time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=5)
        missing = {t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None}
        if missing:
            time.sleep(0.1)
    if missing:
        raise TopicCreationError(f"topics not visible after {timeout:.0f}s: {', '.join(sorted(missing))}")


#: What adding partitions does to keyed records, said wherever partitions are added.
GROWTH_WARNING = (
    "adding partitions moves Kafka's default key -> partition mapping (hash(key) % partitions): "
    "records of one key may now land on another partition than before. tierq's own producers "
    "choose partitions explicitly, so this is harmless for them; outside clients that publish "
    "with the default partitioner and rely on per-key order across the change may see it broken "
    "once."
)


@dataclass(frozen=True)
class PartitionGrowth:
    """An existing topic whose partition count differs from the topology's."""

    topic: str
    before: int
    wanted: int
    #: partitions now (``wanted`` once grown, ``before`` otherwise)
    after: int
    #: why it was not grown: the topology asks for fewer, the broker cannot, or an error
    problem: str | None = None
    #: the broker refused for another reason than lacking the feature
    failed: bool = False

    @property
    def grown(self) -> bool:
        return self.after > self.before

    @property
    def state(self) -> str:
        return f"grown {self.before} -> {self.after}" if self.grown else "exists"


def grow_topics(settings: Settings, topology: Topology, topics: list[str] | None = None,
                timeout: float = 30.0) -> dict[str, PartitionGrowth]:
    """Add partitions to existing topics of ``topology`` (or only to ``topics``) that have fewer
    than it asks for; never remove any. Returns an entry for every existing topic whose count
    differs from the topology's, whether grown or not (``problem`` says why not).

    Tansu 0.6.0, the embedded broker, does not support CreatePartitions: there each such topic is
    reported with ``problem`` set and left as it is. See ``GROWTH_WARNING`` for what growing does
    to keyed records.
    """
    wanted = {spec.name: spec.partitions for spec in topology.topic_specs()
              if topics is None or spec.name in topics}
    if not wanted:
        return {}
    admin = AdminClient(settings.librdkafka("admin"))
    metadata = admin.list_topics(timeout=timeout).topics
    current = {name: len(metadata[name].partitions) for name in wanted
               if name in metadata and metadata[name].error is None}
    result: dict[str, PartitionGrowth] = {}
    to_grow: dict[str, int] = {}
    for name, count in current.items():
        if count > wanted[name]:
            result[name] = PartitionGrowth(name, count, wanted[name], count,
                                           f"{count} partitions; topics.yaml asks for {wanted[name]}: "
                                           "partitions are never removed")
        elif count < wanted[name]:
            to_grow[name] = count
    if not to_grow:
        return result
    futures = admin.create_partitions([NewPartitions(name, wanted[name]) for name in to_grow],
                                      operation_timeout=timeout, request_timeout=timeout)
    for name, count in to_grow.items():
        try:
            futures[name].result(timeout=timeout)
            result[name] = PartitionGrowth(name, count, wanted[name], wanted[name])
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in (KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION):
                problem, failed = (f"{count} partitions; topics.yaml asks for {wanted[name]}: this broker "
                                   "cannot add partitions (no CreatePartitions; Tansu 0.6.0 has none), "
                                   "so the topic keeps its partitions"), False
            else:
                problem, failed = (f"{count} partitions; topics.yaml asks for {wanted[name]}: "
                                   f"adding partitions failed: {error.str()}"), True
            result[name] = PartitionGrowth(name, count, wanted[name], count, problem, failed)
    return result
