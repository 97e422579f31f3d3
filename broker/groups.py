"""The pool's consumer groups: one per band topic (``Topology.band_groups``), and the one-time
move of committed offsets from the single pool group that earlier versions used.

Earlier tierq workers consumed all three band topics in one group, ``tierq-<pool>``. A worker
of this version starting against such a pool would otherwise begin its new band groups at the
log start (``auto.offset.reset=earliest``) and serve again everything ever answered. So before
joining, a worker copies the old group's committed offset of every partition for which its band
group has none yet (``adopt_pool_group_offsets``). Kafka accepts such a commit only while the
band group has no members, which is exactly the first start of an upgraded pool; later starts
find the band group's own offsets and copy nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.settings import Settings

log = structlog.get_logger("tierq.groups")


def committed_offsets(admin: AdminClient, group: str, partitions: list[TopicPartition],
                      timeout: float) -> dict[tuple[str, int], int]:
    """``group``'s committed offset of each of ``partitions`` that has one ({} for no such group)."""
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(tp.topic, tp.partition) for tp in partitions])
    future = admin.list_consumer_group_offsets([request], request_timeout=timeout)[group]
    try:
        answer = future.result()
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
            return {}
        raise
    return {(tp.topic, tp.partition): tp.offset for tp in answer.topic_partitions
            if tp.error is None and tp.offset >= 0}


def adopt_pool_group_offsets(settings: Settings, pool_group: str, band_groups: Mapping[str, str],
                             timeout: float = 10.0) -> dict[str, int]:
    """Copy ``pool_group``'s committed offsets into each topic's band group where it has none.

    Returns the number of partitions adopted per band group. Failures are logged, not raised:
    a pool that never ran an older version has nothing to adopt, and a band group that already
    has members (another upgraded worker got there first) refuses the commit and needs none."""
    admin = AdminClient(settings.librdkafka("groups-admin", **{"allow.auto.create.topics": False}))
    adopted: dict[str, int] = {}
    try:
        metadata = admin.list_topics(timeout=timeout)
        partitions = {topic: [TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)]
                      for topic in band_groups if topic in metadata.topics}
        old = committed_offsets(admin, pool_group, [tp for tps in partitions.values() for tp in tps], timeout)
        if not old:
            return adopted
        for topic, group in band_groups.items():
            own = committed_offsets(admin, group, partitions.get(topic, []), timeout)
            missing = [TopicPartition(topic, p, offset) for (t, p), offset in old.items()
                       if t == topic and (t, p) not in own]
            if not missing:
                continue
            future = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, missing)],
                                                        request_timeout=timeout)[group]
            future.result()
            adopted[group] = len(missing)
            log.info("pool_group_offsets_adopted", group=group, from_group=pool_group,
                     offsets={f"{tp.topic}[{tp.partition}]": tp.offset for tp in missing})
    except KafkaException as exc:
        log.warning("pool_group_offsets_not_adopted", from_group=pool_group, error=str(exc),
                    why="a band group with members already has its own offsets; otherwise check the broker")
    return adopted
