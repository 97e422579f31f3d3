"""The embedded broker: the same launcher serves `tierq broker` and the fixtures."""

import signal
import subprocess
import sys

import pytest
from confluent_kafka.admin import AdminClient

from broker.embedded import EmbeddedBroker

pytestmark = pytest.mark.integration


def test_embedded_broker_starts_answers_and_stops(tmp_path):
    broker = EmbeddedBroker(log_path=tmp_path / "log").start()
    try:
        assert AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=5) is not None
    finally:
        broker.stop()
    assert not broker.running


def test_cli_broker_prints_address_and_stops_on_sigterm():
    with subprocess.Popen([sys.executable, "-m", "tierq", "broker"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as process:
        try:
            address = process.stdout.readline().strip()
            assert address.startswith("127.0.0.1:")
            assert AdminClient({"bootstrap.servers": address}).list_topics(timeout=5) is not None
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            process.kill()
