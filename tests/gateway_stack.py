"""A real gateway and a worker on a given engine, on isolated topics: the one factory behind the
gateway, streaming, OpenAI-compatibility and structured-output modules' fixtures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn

from bench.common import wait_until_ready
from broker.embedded import free_port
from broker.topics import create_topics
from producer.gateway.app import create_app
from producer.gateway.settings import GatewaySettings
from schemas.messages import Reply
from schemas.tenants import hash_api_key, new_api_key
from schemas.topology import Topology
from tests.conftest import isolated_topology
from tests.worker_fixtures import spawn_worker
from worker.service import Worker


@dataclass
class GatewayStack:
    url: str
    keys: dict[str, str]
    topology: Topology
    settings: GatewaySettings
    engine: Any
    worker: Worker
    #: the app's Gateway (its bridge and batch service), for tests that look inside
    gateway: Any

    def client(self, tenant: str, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("timeout", 120)
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0, **kwargs)

    def http(self, tenant: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=120)

    async def reply(self, request_id: str, timeout: float = 120) -> Reply:
        """The request's reply as the gateway received it."""
        reply = await self.gateway.bridge.wait_reply(request_id, timeout)
        assert reply is not None, f"no reply for {request_id}"
        return reply


@asynccontextmanager
async def gateway_stack(bootstrap: str, base_topology: Topology, engine: Any, state: Path,
                        tenants: dict[str, dict[str, Any]], *, pools: dict[str, str] | None = None,
                        worker_id: str = "test/default", **worker: Any) -> AsyncIterator[GatewayStack]:
    """A gateway (uvicorn on a free port, this loop) and one worker of pool default on ``engine``;
    ``pools`` adds pools (name: description) that no worker serves unless a test starts one."""
    keys = {tenant: new_api_key() for tenant in tenants}
    document = isolated_topology(base_topology, f"gw{uuid.uuid4().hex[:8]}").model_dump(mode="json")
    for pool, description in (pools or {}).items():
        document["pools"][pool] = {"description": description}
    document["tenants"] = {t: {**cfg, "api_key_hashes": [hash_api_key(keys[t])]} for t, cfg in tenants.items()}
    topology = Topology.model_validate(document)
    port = free_port()
    settings = GatewaySettings(_env_file=None, bootstrap_servers=bootstrap, gateway_port=port, state_dir=state,
                               topics_file=state / "absent-topics.yaml", tenants_file=state / "tenants.yaml",
                               gateway_timeout_s=120)
    create_topics(settings, topology)
    worker_obj, worker_task = spawn_worker(engine, bootstrap, topology, worker_id=worker_id, **worker)
    app = create_app(settings, topology)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    server_task = asyncio.get_running_loop().create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(url)
        yield GatewayStack(url, keys, topology, settings, engine, worker_obj, app.state.gateway)
    finally:
        server.should_exit = True
        await asyncio.wait_for(server_task, 30)
        worker_obj.request_stop()
        assert await asyncio.wait_for(worker_task, 60) == 0
