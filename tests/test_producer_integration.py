"""Publishing against a real broker: routing, keys, headers, bad lines, and collection."""

from __future__ import annotations

import orjson
import pytest

from tierq.cli import main
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.codec import MessageError, decode_request, encode
from schemas.lanes import READ_AHEAD_PER_PARTITION
from schemas.messages import Band, ErrorCode, Reply, Status
from tests.kafka_helpers import read_topics

pytestmark = pytest.mark.integration

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


def headers_of(msg) -> dict[str, str]:
    return {k: v.decode() for k, v in msg.headers()}


def test_submit_example_file_routes_by_band_and_keys_by_tenant(settings, topology, topics_file, capsys):
    code = main(["submit", str(EXAMPLES / "requests.jsonl"), "--bootstrap", settings.bootstrap_servers,
                 "--topics", str(topics_file), "--no-progress"])
    assert code == 0
    lines = [orjson.loads(line) for line in (EXAMPLES / "requests.jsonl").read_bytes().splitlines() if line.strip()]
    band_topics = topology.pool_topics("default")
    messages = read_topics(settings.bootstrap_servers, list(band_topics.values()), expect=len(lines))
    assert len(messages) == len(lines)
    by_custom_id = {}
    for msg in messages:
        request = decode_request(msg.value())
        assert msg.topic() == band_topics[request.priority]
        assert msg.key() == request.tenant_id.encode()
        assert headers_of(msg) == {
            "request_id": request.request_id, "tenant_id": request.tenant_id, "priority": request.priority.value
        }
        by_custom_id[request.metadata["custom_id"]] = request
    for line in lines:
        request = by_custom_id[line["metadata"]["custom_id"]]
        assert (request.tenant_id, request.priority.value) == (line["tenant_id"], line["priority"])
    assert len({r.request_id for r in by_custom_id.values()}) == len(lines)
    assert "published 10, rejected 0" in capsys.readouterr().err


def test_bad_lines_are_reported_and_good_ones_published(settings, topology, topics_file, tmp_path, capsys):
    good = {"tenant_id": "acme", "priority": "low", "prompt": "hi", "params": {"max_tokens": 4}}
    bad_lines = [
        b"not json", b"[1,2]", b'{"tenant_id": "acme", "priority": "low"}',
        orjson.dumps({**good, "priority": "urgent"}), orjson.dumps({**good, "tenant_id": "nobody"}),
        orjson.dumps({**good, "params": {"max_tokens": -3}}), orjson.dumps({**good, "schema": "tierq.request/v2"}),
        orjson.dumps({**good, "tenant_id": "globex", "priority": "high"}),
        orjson.dumps({**good, "pool": "elsewhere"}), b"\xff\xfe\xfd",
    ]
    lines, bad_numbers = [], []
    for i in range(100):
        if i % 10 == 3:
            lines.append(bad_lines[len(bad_numbers)])
            bad_numbers.append(i + 1)
        else:
            lines.append(orjson.dumps({**good, "metadata": {"custom_id": f"row-{i + 1}"}}))
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    errors = tmp_path / "errors.jsonl"

    code = main(["submit", str(path), "--bootstrap", settings.bootstrap_servers, "--topics", str(topics_file),
                 "--errors", str(errors), "--no-progress"])

    assert code == 1, "a partial failure must show in the exit status"
    stderr = capsys.readouterr().err
    assert "published 90, rejected 10" in stderr
    reported = [orjson.loads(line) for line in errors.read_bytes().splitlines()]
    assert [r["line"] for r in reported] == bad_numbers
    codes = [r["code"] for r in reported]
    assert codes.count("unknown_tenant") == 1 and "forbidden_priority" in codes and "unsupported_schema" in codes
    assert "forbidden_pool" in codes or "unknown_pool" in codes
    for number in bad_numbers:
        assert f"mixed.jsonl:{number}: " in stderr
    messages = read_topics(settings.bootstrap_servers, [topology.band_topic("default", Band.low)], expect=90)
    assert len(messages) == 90


def test_openai_batch_file_needs_and_takes_a_tenant(settings, topology, topics_file):
    args = ["submit", str(EXAMPLES / "openai-batch.jsonl"), "--bootstrap", settings.bootstrap_servers,
            "--topics", str(topics_file), "--no-progress"]
    assert main(args) == 1  # no tenant: every line is rejected
    assert main([*args, "--tenant", "globex", "--priority", "low"]) == 0
    messages = read_topics(settings.bootstrap_servers, [topology.band_topic("default", Band.low)], expect=4)
    requests = [decode_request(m.value()) for m in messages]
    assert sorted(r.metadata["custom_id"] for r in requests) == [f"batch-{i}" for i in range(4)]
    assert all(r.tenant_id == "globex" for r in requests)


def test_producer_library_future_and_errors(settings, topology):
    with Producer(settings, topology) as producer:
        delivery = producer.submit({"tenant_id": "acme", "priority": "high", "prompt": "x"}).result(timeout=10)
        assert delivery.topic == topology.band_topic("default", Band.high) and delivery.offset >= 0
        with pytest.raises(MessageError) as info:
            producer.submit({"tenant_id": "globex", "priority": "high", "prompt": "x"})
        assert info.value.code is ErrorCode.forbidden_priority


def test_priority_above_max_can_be_lowered(settings, base_topology):
    from tests.conftest import isolated_topology
    from broker.topics import create_topics

    document = isolated_topology(base_topology, "lower").model_dump(mode="json")
    document["tenants"]["globex"]["on_priority_above_max"] = "lower"
    topology = type(base_topology).model_validate(document)
    create_topics(settings, topology)
    with Producer(settings, topology) as producer:
        request = producer.prepare({"tenant_id": "globex", "priority": "high", "prompt": "x"})
    assert request.priority is Band.medium


def test_result_collector_dedupes_and_cli_writes_jsonl(settings, topology, topics_file, tmp_path):
    import confluent_kafka

    raw = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers})
    topic = topology.reply_topic("acme")
    for i in [0, 1, 2, 1]:  # request 1 answered twice, as after a worker crash
        reply = Reply(request_id=f"r{i}", tenant_id="acme", status=Status.ok, text=f"t{i}")
        raw.produce(topic, key=reply.request_id.encode(), value=encode(reply))
    raw.produce(topic, key=b"junk", value=b"garbage")
    raw.flush(10)

    with ResultCollector(settings, topology, "acme") as collector:
        replies = list(collector.replies(timeout=20))
    assert sorted(r.request_id for r in replies) == ["r0", "r1", "r2"]
    assert collector.stats.duplicates == 1 and len(collector.stats.undecodable) == 1

    out = tmp_path / "out.jsonl"
    code = main(["results", "--tenant", "acme", "--out", str(out), "--expect", "3", "--timeout", "20",
                 "--bootstrap", settings.bootstrap_servers, "--topics", str(topics_file)])
    assert code == 0
    assert sorted(orjson.loads(line)["request_id"] for line in out.read_bytes().splitlines()) == ["r0", "r1", "r2"]


def test_topics_create_is_idempotent(settings, topics_file, capsys):
    args = ["topics", "create", "--bootstrap", settings.bootstrap_servers, "--topics", str(topics_file)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("exists") == len(out.splitlines()) and "created" not in out


def test_gateway_reply_listener_reads_on_while_a_reply_topic_is_missing(settings, topology):
    """One tenant's missing reply topic must not stop the gateway reading the others'."""
    import time

    from confluent_kafka.admin import AdminClient, NewTopic

    from producer.gateway.bridge import ReplyListener

    present, missing = topology.reply_topic("acme"), f"{topology.reply_topic('acme')}-later"
    received: list[Reply] = []
    listener = ReplyListener(settings, [present, missing], received.append, from_beginning=True)
    listener.start()
    try:
        raw = __import__("confluent_kafka").Producer({"bootstrap.servers": settings.bootstrap_servers})

        def reply(rid: str) -> bytes:
            return encode(Reply(request_id=rid, tenant_id="acme", status=Status.ok, text="x"))

        raw.produce(present, key=b"r1", value=reply("r1"))
        raw.flush(10)
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.request_id for r in received] == ["r1"], "the present topic is read although the other is missing"
        assert listener.assigned.is_set()
        admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
        admin.create_topics([NewTopic(missing, 1, 1)])[missing].result(10)
        raw.produce(missing, key=b"r2", value=reply("r2"))
        raw.flush(10)
        deadline = time.monotonic() + 20
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.request_id for r in received] == ["r1", "r2"], "the late topic is picked up once it exists"
    finally:
        listener.stop()
        listener.join(10)


def test_the_router_counts_backlog_beyond_the_pools_read_ahead_setting(settings, topology):
    """Producers judge what a worker cannot have read yet by TIERQ_READ_AHEAD_PER_PARTITION, the
    same setting the pool's workers read (a pool that lowers it must not be routed as if 256)."""
    narrow = settings.model_copy(update={"read_ahead_per_partition": 32})
    with Producer(narrow, topology, on_quota="off") as producer:
        assert producer._lane_router().read_ahead == 32
    with Producer(settings, topology, on_quota="off") as producer:
        assert producer._lane_router().read_ahead == READ_AHEAD_PER_PARTITION
