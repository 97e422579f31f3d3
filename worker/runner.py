"""Running a worker process: resolve broker and model defaults, start the engine, handle signals."""

from __future__ import annotations

import asyncio
import signal

import structlog

from broker.embedded import local_broker
from schemas.tenants import TenantsReloader
from schemas.topology import Topology
from worker.engine import Engine, EngineConfig
from worker.gpu_compat import prepare_for_mig
from worker.service import build_worker
from worker.settings import WorkerSettings
from worker.simulated import SimulatedEngine
from worker.tinymodel import make_tiny_model

log = structlog.get_logger("tierq.runner")


def engine_config(settings: WorkerSettings, topology: Topology) -> EngineConfig:
    model = topology.pools[settings.pool].model or settings.model
    extra = dict(settings.engine_extra)
    dtype, max_model_len = settings.dtype, settings.max_model_len
    if model is None:
        model = str(make_tiny_model(settings.model_dir_default()))
        log.warning("tiny_test_model", path=model,
                    note="no model configured (TIERQ_MODEL): serving a tiny random model; its text is random")
        dtype, max_model_len = "float32", max_model_len or 512
        extra.setdefault("enforce_eager", True)
    return EngineConfig(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
                        gpu_memory_utilization=settings.gpu_memory_utilization,
                        tensor_parallel_size=settings.tensor_parallel_size, extra=extra)


async def serve(settings: WorkerSettings, topology: Topology, engine: Engine) -> int:
    reloader = TenantsReloader(settings.topics_file, settings.tenants_file,
                               on_error=lambda problem: log.error("tenants_reload_failed", problem=problem))
    worker = build_worker(settings, topology, engine, reloader=reloader)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.request_stop)
    return await worker.run()


def start_engine(settings: WorkerSettings, topology: Topology) -> Engine | SimulatedEngine:
    """vLLM, or with ``engine: simulated`` the simulated engine (no model, no GPU: nothing to prepare)."""
    if settings.engine == "simulated":
        engine = SimulatedEngine.from_settings(settings)
        log.warning("simulated_engine", params=str(engine.params),
                    note="TIERQ_ENGINE=simulated: no model runs; replies are filler text marked simulated")
        return engine
    prepare_for_mig()
    return Engine.start(engine_config(settings, topology))


def run_worker(settings: WorkerSettings, topology: Topology) -> int:
    """Serve the pool until SIGTERM/SIGINT (graceful; a second one aborts)."""
    if settings.metrics_port:
        from worker import metrics

        metrics.serve(settings.metrics_port)
    with local_broker(settings, topology) as settings:
        engine = start_engine(settings, topology)
        try:
            return asyncio.run(serve(settings, topology, engine))
        finally:
            engine.shutdown()

