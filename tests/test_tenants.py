"""Tenants file, API key hashing, `tierq tenant` commands and live reload."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tierq.cli import main
from schemas.tenants import ApiKeys, TenantsReloader, hash_api_key, new_api_key, read_tenants_file
from schemas.tenants import load_topology
from schemas.topology import TopologyError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    topics = tmp_path / "topics.yaml"
    shutil.copy(ROOT / "topics.yaml", topics)
    return topics, tmp_path / "tenants.yaml"


def cli(files: tuple[Path, Path], *args: str) -> int:
    topics, tenants = files
    return main([*args, "--topics", str(topics), "--tenants-file", str(tenants)])


def test_keys_are_random_and_stored_only_as_hashes(files, capsys):
    assert cli(files, "tenant", "add", "hooli", "--requests-per-s", "5", "--max-priority", "low") == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("tq-") and len(key) > 40
    text = files[1].read_text()
    assert key not in text and hash_api_key(key) in text
    assert os.stat(files[1]).st_mode & 0o077 == 0, "the tenants file must be private to its owner"
    topology = load_topology(*files)
    assert topology.tenants["hooli"].quotas.requests_per_s == 5
    assert ApiKeys(topology).tenant_for(key) == "hooli"
    assert ApiKeys(topology).tenant_for(new_api_key()) is None


def test_rotate_revokes_old_keys_unless_asked_to_keep_them(files, capsys):
    assert cli(files, "tenant", "rotate-key", "acme") == 0  # acme lives in topics.yaml: copied over
    first = capsys.readouterr().out.strip()
    assert cli(files, "tenant", "rotate-key", "acme", "--keep-old") == 0
    second = capsys.readouterr().out.strip()
    keys = ApiKeys(load_topology(*files))
    assert keys.tenant_for(first) == keys.tenant_for(second) == "acme"
    assert cli(files, "tenant", "rotate-key", "acme") == 0
    third = capsys.readouterr().out.strip()
    keys = ApiKeys(load_topology(*files))
    assert keys.tenant_for(third) == "acme" and keys.tenant_for(first) is None and keys.tenant_for(second) is None
    # the rest of acme's configuration came along from topics.yaml
    assert load_topology(*files).tenants["acme"].quotas.max_in_flight == 32


def test_clear_errors(files, capsys):
    assert cli(files, "tenant", "add", "acme") == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(files, "tenant", "add", "newco", "--pool", "nope") == 2
    assert "unknown pool 'nope'" in capsys.readouterr().err
    assert cli(files, "tenant", "rotate-key", "ghost") == 2
    assert "unknown tenant 'ghost'" in capsys.readouterr().err
    files[1].write_text("tenants:\n  x:\n    api_key_hashes: [plain-text-key]\n")
    with pytest.raises(TopologyError, match=r"(?s)tenants\.yaml.*tenants\.x\.api_key_hashes\.0"):
        read_tenants_file(files[1])


def test_list_never_prints_keys(files, capsys):
    cli(files, "tenant", "add", "hooli")
    key = capsys.readouterr().out.strip()
    assert cli(files, "tenant", "list") == 0
    out = capsys.readouterr().out
    assert "hooli" in out and "acme" in out and key not in out and "sha256" not in out


def test_reloader_adopts_new_tenants_and_survives_a_broken_file(files, capsys):
    topology = load_topology(*files)
    errors: list[str] = []
    reloader = TenantsReloader(*files, interval_s=0, on_error=errors.append)
    assert reloader.reload(topology) is None  # nothing changed
    cli(files, "tenant", "add", "hooli")
    capsys.readouterr()
    reloaded = reloader.reload(topology)
    assert reloaded is not None and "hooli" in reloaded.tenants
    files[1].write_text("tenants: [broken\n")
    assert reloader.reload(reloaded) is None
    assert errors and "tenants.yaml" in errors[0]
