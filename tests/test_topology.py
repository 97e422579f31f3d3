"""topics.yaml: the shipped file is valid and every broken reference names file and key."""

from pathlib import Path

import pytest
import yaml

from schemas.messages import Band
from schemas.tenants import load_topology
from schemas.topology import TopologyError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, document) -> Path:
    path = tmp_path / "topics.yaml"
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


@pytest.fixture
def shipped() -> dict:
    return yaml.safe_load((ROOT / "topics.yaml").read_text())


def test_shipped_topology(shipped):
    topology = load_topology(ROOT / "topics.yaml")
    assert topology.pool_topics("default") == {
        Band.high: "tierq.default.high", Band.medium: "tierq.default.medium", Band.low: "tierq.default.low"
    }
    assert topology.reply_topic("acme") == "tierq.replies.acme"
    assert {"acme", "globex"} <= set(topology.tenants)
    names = [spec.name for spec in topology.topic_specs()]
    assert "tierq.dlq" in names and "tierq.replies.globex" in names and len(names) == len(set(names))
    attempts = next(s for s in topology.topic_specs() if s.name == "tierq.attempts")
    assert attempts.config == {"cleanup.policy": "compact"}


def test_pool_may_name_its_own_topics(tmp_path, shipped):
    shipped["pools"]["gold"] = {"topics": {"high": "gold-hi"}}
    topology = load_topology(write(tmp_path, shipped))
    assert topology.band_topic("gold", Band.high) == "gold-hi"
    assert topology.band_topic("gold", Band.low) == "tierq.gold.low"


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["tenants"]["acme"].update(pool="nowhere"), "tenants.acme.pool: unknown pool 'nowhere'"),
        (lambda d: d["bands"].pop("medium"), "bands: missing band(s) medium"),
        (lambda d: d["pools"].update(other={"topics": {"high": "tierq.default.high"}}),
         "pools.other.topics.high: topic 'tierq.default.high' is already used by pools.default.topics.high"),
        (lambda d: d["dlq"].update(topic="tierq.default.low"), "dlq.topic: topic 'tierq.default.low' is already used"),
        (lambda d: d["bands"]["high"].update(aging_step_s=10), "bands.high.aging_step_s"),
        (lambda d: d["bands"]["low"].update(partitions=0), "bands.low.partitions"),
        (lambda d: d["tenants"]["acme"].update(max_priority="urgent"), "tenants.acme.max_priority"),
        (lambda d: d["tenants"]["acme"]["quotas"].update(requests_per_s=-1), "tenants.acme.quotas.requests_per_s"),
        (lambda d: d["replies"].update(topic_pattern="replies"), "replies.topic_pattern: must contain"),
        (lambda d: d.update(topic_pattern="tierq/{pool}/{band}"), "is not a valid Kafka topic name"),
        (lambda d: d.update(colour="blue"), "colour"),
        (lambda d: d.update(pools={}), "pools"),
    ],
)
def test_errors_name_file_and_key(tmp_path, shipped, mutate, fragment):
    mutate(shipped)
    path = write(tmp_path, shipped)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(TopologyError, match="topics file not found"):
        load_topology(tmp_path / "absent.yaml")


def test_bad_yaml(tmp_path):
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(write(tmp_path, "bands: [unclosed"))


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(TopologyError, match="expected a mapping"):
        load_topology(write(tmp_path, "- a\n- b\n"))
