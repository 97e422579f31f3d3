"""Settings come from TIERQ_* variables; secrets reach librdkafka but never a repr."""

import pytest

from schemas.settings import BrokerNotConfigured, Settings


def test_env_prefix_and_nesting(monkeypatch):
    monkeypatch.setenv("TIERQ_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("TIERQ_SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TIERQ_SECURITY__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("TIERQ_SECURITY__SASL_USERNAME", "svc")
    monkeypatch.setenv("TIERQ_SECURITY__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("TIERQ_KAFKA_EXTRA", '{"socket.keepalive.enable": "true"}')
    settings = Settings(_env_file=None)
    conf = settings.librdkafka("producer", acks="all")
    assert conf["bootstrap.servers"] == "k1:9092,k2:9092"
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.password"] == "hunter2"
    assert conf["socket.keepalive.enable"] == "true"
    assert conf["client.id"] == "tierq-producer" and conf["acks"] == "all"
    assert "hunter2" not in repr(settings)


def test_dotenv_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TIERQ_BOOTSTRAP_SERVERS", raising=False)
    env = tmp_path / ".env"
    env.write_text("TIERQ_BOOTSTRAP_SERVERS=fromfile:9092\nTIERQ_TOPICS_FILE=/etc/tierq/topics.yaml\n")
    settings = Settings(_env_file=env)
    assert settings.bootstrap_servers == "fromfile:9092"
    assert str(settings.topics_file) == "/etc/tierq/topics.yaml"


def test_missing_bootstrap_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TIERQ_BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(BrokerNotConfigured, match="TIERQ_BOOTSTRAP_SERVERS"):
        Settings(_env_file=None).librdkafka("admin")


def test_invalid_security_protocol(monkeypatch):
    monkeypatch.setenv("TIERQ_SECURITY__PROTOCOL", "SMOKE_SIGNALS")
    with pytest.raises(ValueError, match="security.protocol"):
        Settings(_env_file=None)


def test_each_bands_fetch_wait_reaches_its_consumer(monkeypatch):
    from schemas.messages import Band
    from worker.intake import consumer_config
    from worker.settings import WorkerSettings

    monkeypatch.setenv("TIERQ_FETCH_WAIT_MS", '{"low": 250}')
    settings = WorkerSettings(_env_file=None, bootstrap_servers="k:9092")
    assert settings.fetch_wait_ms == {Band.high: 50, Band.medium: 50, Band.low: 250}
    conf = consumer_config(settings, "tierq-default-low", 10_000, "w1", settings.fetch_wait_ms[Band.low])
    assert conf["fetch.wait.max.ms"] == 250 and conf["group.id"] == "tierq-default-low"
    monkeypatch.setenv("TIERQ_FETCH_WAIT_MS", '{"high": 0}')
    with pytest.raises(ValueError, match="fetch_wait_ms"):
        WorkerSettings(_env_file=None)


@pytest.mark.parametrize("reader, default, out_of_range", [("control", 20, "0"), ("attempts", 100, "60000")])
def test_a_readers_fetch_wait_reaches_its_consumer(monkeypatch, reader, default, out_of_range):
    """TIERQ_CONTROL_FETCH_WAIT_MS / TIERQ_ATTEMPTS_FETCH_WAIT_MS: default, parsed, in the consumer's
    config, bounded."""
    from worker.attempts import attempts_consumer_config
    from worker.control import control_consumer_config
    from worker.settings import WorkerSettings

    config = {"control": control_consumer_config, "attempts": attempts_consumer_config}[reader]
    env, field = f"TIERQ_{reader.upper()}_FETCH_WAIT_MS", f"{reader}_fetch_wait_ms"
    monkeypatch.delenv(env, raising=False)
    assert getattr(WorkerSettings(_env_file=None), field) == default
    monkeypatch.setenv(env, "500")
    settings = WorkerSettings(_env_file=None, bootstrap_servers="k:9092")
    assert config(settings, getattr(settings, field))["fetch.wait.max.ms"] == 500
    monkeypatch.setenv(env, out_of_range)
    with pytest.raises(ValueError, match=field):
        WorkerSettings(_env_file=None)
