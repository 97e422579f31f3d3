"""The pool's consumer groups: one per band topic (``Topology.band_groups``), and the one-time
move of committed offsets from the single pool group that earlier versions used.

Earlier tierq workers consumed all three band topics in one group, ``tierq-<pool>``. A worker
of this version starting against such a pool would otherwise begin its new band groups at the
log start (``auto.offset.reset=earliest``) and serve again everything ever answered. So before
joining, a worker copies the old group's committed offset of every partition for which its band
group has none yet (``adopt_pool_group_offsets``). Kafka accepts such a commit only while the
band group has no members, which is exactly the first start of an upgraded pool; later starts
find the band group's own offsets and copy nothing. If the copy cannot be made (or checked), the
worker does not start (``GroupAdoptionError``; its supervisor's restart tries again).
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


class GroupAdoptionError(RuntimeError):
    """The old pool group's offsets could not be carried into the band groups: joining anyway
    would serve every retained request again, so the worker does not start (a restart retries)."""


def adopt_pool_group_offsets(settings: Settings, pool_group: str, band_groups: Mapping[str, str],
                             timeout: float = 10.0, admin: AdminClient | None = None) -> dict[str, int]:
    """Copy ``pool_group``'s committed offsets into each topic's band group where it has none.

    Returns the number of partitions adopted per band group. A pool that never ran an older
    version has nothing to adopt. A band group that refuses the commit because another upgraded
    worker joined it first has its own offsets by then (read again to be sure). Anything else
    raises ``GroupAdoptionError``: the broker did not answer, or offsets would be left behind."""
    return copy_committed_offsets(settings, dict.fromkeys(band_groups, pool_group), band_groups, timeout, admin)


def copy_committed_offsets(settings: Settings, sources: Mapping[str, str], targets: Mapping[str, str],
                           timeout: float = 10.0, admin: AdminClient | None = None) -> dict[str, int]:
    """For each topic of ``targets``, copy the committed offsets of its group in ``sources`` into its
    group in ``targets`` where that one has none (``adopt_pool_group_offsets``; ``tierq groups
    copy``). Returns the partitions copied per target group; raises ``GroupAdoptionError`` as that
    function says. Kafka accepts the commit only while the target group has no members."""
    admin = admin or AdminClient(settings.librdkafka("groups-admin", **{"allow.auto.create.topics": False}))
    adopted: dict[str, int] = {}
    described = " / ".join(sorted(set(sources.values())))
    try:
        metadata = admin.list_topics(timeout=timeout)
        partitions = {topic: [TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)]
                      for topic in targets if topic in metadata.topics and metadata.topics[topic].partitions}
        old: dict[tuple[str, int], int] = {}
        for source in sorted(set(sources.values())):
            wanted = [tp for topic, tps in partitions.items() if sources.get(topic) == source for tp in tps]
            old.update(committed_offsets(admin, source, wanted, timeout) if wanted else {})
        for topic, group in targets.items():
            missing = _missing(admin, group, topic, partitions.get(topic, []), old, timeout)
            if not missing:
                continue
            future = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, missing)],
                                                        request_timeout=timeout)[group]
            try:
                refused = [tp for tp in future.result().topic_partitions if tp.error is not None]
            except KafkaException as exc:
                refused, why = missing, str(exc)
            else:
                why = "; ".join(f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in refused)
            if refused and _missing(admin, group, topic, partitions[topic], old, timeout):
                raise GroupAdoptionError(f"cannot copy {sources[topic]}'s committed offsets into {group} ({why}); "
                                         "starting would serve its answered requests again")
            adopted[group] = len(missing)
            log.info("pool_group_offsets_adopted", group=group, from_group=sources[topic],
                     offsets={f"{tp.topic}[{tp.partition}]": tp.offset for tp in missing})
    except KafkaException as exc:
        raise GroupAdoptionError(f"cannot read the committed offsets of {described} or of {', '.join(sorted(targets.values()))}: "
                                 f"{exc}; starting could serve answered requests again") from None
    return adopted


def _missing(admin: AdminClient, group: str, topic: str, partitions: list[TopicPartition],
             old: Mapping[tuple[str, int], int], timeout: float) -> list[TopicPartition]:
    """The old group's offsets of ``topic`` that ``group`` has no committed offset for."""
    wanted = [TopicPartition(t, p, offset) for (t, p), offset in old.items() if t == topic]
    if not wanted:
        return []
    own = committed_offsets(admin, group, partitions, timeout)
    return [tp for tp in wanted if (tp.topic, tp.partition) not in own]
