"""Tenants and their API keys.

Tenants live in topics.yaml and, optionally, in a separate tenants file
(``TIERQ_TENANTS_FILE``, default ``./tenants.yaml``, read only when it exists) that the
``tierq tenant`` commands write. A tenant in the tenants file replaces the one of the
same id in topics.yaml, so topics.yaml can stay hand-edited and free of secrets.

API keys are 256 random bits; only their SHA-256 is stored. A slow password hash would
buy nothing for keys with that much entropy and would cost every gateway request.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from schemas.messages import TenantId
from schemas.topology import TenantConfig, Topology, TopologyError, describe_validation_error, read_topology_file

KEY_PREFIX = "tq-"
HASH_PREFIX = "sha256:"

_TENANTS = TypeAdapter(dict[TenantId, TenantConfig])


def new_api_key() -> str:
    """A fresh API key, shown once to the operator and never stored."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def read_tenants_file(path: str | Path) -> dict[str, TenantConfig]:
    """Tenants of a tenants file; ``{}`` when it does not exist. Errors name file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read tenants file: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, dict) or set(document) - {"tenants"}:
        raise TopologyError(f"{path}: expected a mapping with one key, 'tenants'")
    try:
        return _TENANTS.validate_python(document.get("tenants") or {})
    except ValidationError as exc:
        raise TopologyError(f"{path}: invalid tenants:\n  {describe_validation_error(exc, 'tenants')}") from None


def write_tenants_file(path: str | Path, tenants: dict[str, TenantConfig]) -> None:
    """Replace the tenants file atomically, readable by its owner only (it holds key hashes)."""
    path = Path(path)
    document: dict[str, Any] = {
        "tenants": {tid: cfg.model_dump(mode="json", exclude_defaults=True) for tid, cfg in sorted(tenants.items())}
    }
    text = "# Written by `tierq tenant`; API keys are stored as SHA-256 hashes only.\n"
    text += yaml.safe_dump(document, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_topology(topics_file: str | Path, tenants_file: str | Path | None = None) -> Topology:
    """topics.yaml plus the tenants file (if given and present), validated together.

    Raises ``TopologyError`` naming the file and the key.
    """
    return with_tenants_file(read_topology_file(topics_file), tenants_file)


def with_tenants_file(topology: Topology, path: str | Path | None) -> Topology:
    """The topology with the tenants file's tenants added (replacing same-named ones)."""
    if path is None:
        return topology
    extra = read_tenants_file(path)
    if not extra:
        return topology
    return _with_tenants(topology, extra, f"{path}: tenants do not fit the topology")


def _with_tenants(topology: Topology, tenants: dict[str, TenantConfig], problem: str) -> Topology:
    """``topology`` with ``tenants`` added or replaced, validated; TopologyError says ``problem``."""
    document = topology.model_dump(mode="json")
    document["tenants"].update({t: c.model_dump(mode="json") for t, c in tenants.items()})
    try:
        return Topology.model_validate(document)
    except ValidationError as exc:
        raise TopologyError(f"{problem}:\n  {describe_validation_error(exc)}") from None


class ApiKeys:
    """API key -> tenant id, by hash."""

    def __init__(self, topology: Topology):
        self._tenant_by_hash = {h: tid for tid, cfg in topology.tenants.items() for h in cfg.api_key_hashes}

    def tenant_for(self, key: str) -> str | None:
        # Lookup by SHA-256: timing can at most reveal the hash's prefix, not the key.
        return self._tenant_by_hash.get(hash_api_key(key))

    def __len__(self) -> int:
        return len(self._tenant_by_hash)


class TenantExists(TopologyError):
    """``tierq tenant add`` for an id that is already configured."""


def add_tenant(topics_file: str | Path, tenants_file: str | Path, tenant_id: str, config: TenantConfig) -> str:
    """Add a tenant with a new API key to the tenants file; return the key (shown once)."""
    topology = load_topology(topics_file, tenants_file)
    if tenant_id in topology.tenants:
        raise TenantExists(f"tenant {tenant_id!r} already exists; use `tierq tenant rotate-key {tenant_id}`")
    key = new_api_key()
    tenants = read_tenants_file(tenants_file)
    tenants[tenant_id] = config.model_copy(update={"api_key_hashes": [hash_api_key(key)]})
    _check_and_write(topology, tenants_file, tenants)
    return key


def rotate_key(topics_file: str | Path, tenants_file: str | Path, tenant_id: str, keep_old: bool = False) -> str:
    """Give a tenant a new API key (revoking the old ones unless ``keep_old``); return it.

    A tenant defined only in topics.yaml is copied into the tenants file with the key.
    """
    topology = load_topology(topics_file, tenants_file)
    current = topology.tenants.get(tenant_id)
    if current is None:
        raise TopologyError(f"unknown tenant {tenant_id!r}; add it with `tierq tenant add {tenant_id}`")
    key = new_api_key()
    hashes = (list(current.api_key_hashes) if keep_old else []) + [hash_api_key(key)]
    tenants = read_tenants_file(tenants_file)
    tenants[tenant_id] = current.model_copy(update={"api_key_hashes": hashes})
    _check_and_write(topology, tenants_file, tenants)
    return key


def _check_and_write(topology: Topology, tenants_file: str | Path, tenants: dict[str, TenantConfig]) -> None:
    _with_tenants(topology, tenants, f"{tenants_file}: the change does not fit the topology")
    write_tenants_file(tenants_file, tenants)


class TenantsReloader:
    """Notices edits of topics.yaml / the tenants file and reloads them, so new tenants and
    rotated keys take effect in running gateways and workers without a restart.

    Only tenants are adopted from a reload; band, pool and topic changes need a restart.
    A file that fails validation is reported and the last good topology stays in force.
    """

    def __init__(self, topics_file: str | Path, tenants_file: str | Path | None, interval_s: float = 2.0,
                 on_error: Callable[[str], None] | None = None):
        self._files = [Path(topics_file)] + ([Path(tenants_file)] if tenants_file is not None else [])
        self._tenants_file = tenants_file
        self._interval_s = interval_s
        self._on_error = on_error
        self._next_check = time.monotonic() + interval_s
        self._stamp = self._stamps()

    def _stamps(self) -> tuple[tuple[int, int] | None, ...]:
        stamps = []
        for path in self._files:
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def reload(self, current: Topology) -> Topology | None:
        """A topology with the reloaded tenants if a file changed (checked every interval), else None."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self._interval_s
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            fresh = load_topology(self._files[0], self._tenants_file)
        except TopologyError as exc:
            if self._on_error is not None:
                self._on_error(str(exc))
            return None
        if fresh.tenants == current.tenants:
            return None
        return current.model_copy(update={"tenants": fresh.tenants})
