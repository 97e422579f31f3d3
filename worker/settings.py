"""Worker settings: which pool to serve, which model, engine sizing, and safety limits."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from schemas.messages import Band
from schemas.settings import Settings
from worker.models import default_models_dir
from worker.simulated import SimParams


#: a band consumer's fetch.wait.max.ms unless ``TIERQ_FETCH_WAIT_MS`` names the band
DEFAULT_FETCH_WAIT_MS = 50
#: librdkafka wants a fetch's wait at least a second below socket.timeout.ms (60 s)
MAX_FETCH_WAIT_MS = 59_000
#: the control reader's fetch.wait.max.ms unless ``TIERQ_CONTROL_FETCH_WAIT_MS`` says otherwise
DEFAULT_CONTROL_FETCH_WAIT_MS = 20
#: the attempts reader's fetch.wait.max.ms unless ``TIERQ_ATTEMPTS_FETCH_WAIT_MS`` says otherwise
DEFAULT_ATTEMPTS_FETCH_WAIT_MS = 100
#: seconds a band group may spend re-forming before the worker says so (TIERQ_REBALANCE_STUCK_S)
DEFAULT_REBALANCE_STUCK_S = 60.0


class SimulatedSettings(BaseModel):
    """``TIERQ_SIMULATED__*``: the simulated engine's times (ms on the reference H100; see worker/simulated.py)."""

    model_config = {"frozen": True}

    speed: float = Field(default=SimParams.speed, gt=0, description="2.0 = twice as fast, 0.5 = half speed")
    decode_base_ms: float = Field(default=SimParams.decode_base_ms, ge=0, description="a decode step's fixed part")
    decode_per_seq_ms: float = Field(default=SimParams.decode_per_seq_ms, ge=0,
                                     description="a decode step's part per running sequence")
    prefill_ms_per_token: float = Field(default=SimParams.prefill_ms_per_token, ge=0,
                                        description="prefill time per prompt token, in the step a sequence joins")


class WorkerSettings(Settings):
    """``TIERQ_*`` settings of one worker process (one per GPU or MIG slice)."""

    model_config = SettingsConfigDict(
        env_prefix="TIERQ_", env_file=".env", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    pool: str = Field(default="default", description="pool whose three band topics this worker drains")
    engine: Literal["vllm", "simulated"] = Field(
        default="vllm", description="vllm, or simulated: no model, GPU batching modelled (load tests)")
    simulated: SimulatedSettings = Field(default_factory=SimulatedSettings)
    group_id: str | None = Field(default=None, description="the pool's group name (default tierq-<pool>): each band "
                                    "topic is consumed in its own group <name>-<band>")
    model: str | None = Field(
        default=None,
        description="model path or name; 'tiny': the tiny random test model; none: the SmolLM2 folder "
                    "`tierq model prepare` made under models_dir if there is one, else the tiny model")
    models_dir: Path = Field(default_factory=default_models_dir,
                             description="where `tierq model prepare` puts models (default "
                                         "$XDG_DATA_HOME/tierq/models, ~/.local/share/tierq/models)")
    dtype: str = Field(default="auto", description="vLLM dtype (float32 on CPU)")
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=16, ge=1, description="engine slots: requests generated at once")
    engine_queue: int = Field(default=2, ge=0, description="requests allowed to wait inside vLLM beyond its slots")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    engine_extra: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine args, as JSON")
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}/cpu")
    prefetch_per_partition: int | None = Field(
        default=None, ge=1,
        description="buffered requests a source partition may always hold, even when the buffer is over "
                    "read_ahead_bytes (default: twice slots + engine_queue)")
    read_ahead_bytes: int = Field(
        default=32 * 1024 * 1024, ge=0,
        description="buffered request bytes (as read from Kafka) of the whole worker beyond which partitions "
                    "are held to prefetch_per_partition (memory bound; a request costs ~10x its bytes in memory)")
    max_attempts: int = Field(default=3, ge=1, description="engine attempts before a request is dead-lettered")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM grace period for in-flight requests")
    metrics_port: int | None = Field(default=None, description="Prometheus port; unset = no endpoint")
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    rebalance_stuck_s: float = Field(
        default=DEFAULT_REBALANCE_STUCK_S, ge=1,
        description="seconds a band group may spend re-forming (this worker's member not steady) before the "
                    "worker logs band_group_stuck: on Tansu 0.6.0 a group whose leader left while it re-formed "
                    "never re-forms (README, known problems)")
    fetch_wait_ms: dict[Band, int] = Field(
        default_factory=lambda: dict.fromkeys(Band, DEFAULT_FETCH_WAIT_MS),
        description="per band: how long the broker may hold a fetch that finds nothing new (librdkafka "
                    "fetch.wait.max.ms). Kafka answers as soon as a record arrives; Tansu 0.6.0 holds the "
                    "fetch the whole time, so there it is also the band's added latency. Shorter: more "
                    "empty fetches (broker CPU) while idle. JSON, e.g. {\"low\": 250}; bands not named keep 50")

    @field_validator("fetch_wait_ms")
    @classmethod
    def _every_band(cls, value: dict[Band, int]) -> dict[Band, int]:
        if any(ms < 1 or ms > MAX_FETCH_WAIT_MS for ms in value.values()):
            raise ValueError(f"fetch_wait_ms: each band's wait must be 1..{MAX_FETCH_WAIT_MS} ms")
        return {band: value.get(band, DEFAULT_FETCH_WAIT_MS) for band in Band}
    aging: bool = Field(default=True, description="promote waiting requests by aging (false: strict priority only)")
    preempt: bool = Field(default=True, description=(
        "a tenant below its fair share of the slots may take one from a tenant above it: the taken "
        "request (never a streaming one) goes back to its queue and runs again later, its work so far "
        "lost (false: a tenant waits for completions however many slots another holds)"))
    cancel_memory_s: float = Field(default=300.0, gt=0, description=(
        "how long a cancel for a request this worker does not hold is kept (it may arrive later), "
        "and how far back the control topic is read at start"))
    cancel_memory_limit: int = Field(default=100_000, ge=1, description="cancels kept at most (oldest dropped)")
    control_fetch_wait_ms: int = Field(default=DEFAULT_CONTROL_FETCH_WAIT_MS, ge=1, le=MAX_FETCH_WAIT_MS, description=(
        "the control (cancel) reader's fetch.wait.max.ms. Kafka answers as soon as a cancel arrives; "
        "Tansu 0.6.0 holds the fetch the whole time, so there it is the cancel's added latency. Shorter: "
        "more empty fetches (on Tansu ~6% of a core per worker at 20 ms, ~2.4% at 100: bench.fetch_cost)"))
    attempts_fetch_wait_ms: int = Field(default=DEFAULT_ATTEMPTS_FETCH_WAIT_MS, ge=1, le=MAX_FETCH_WAIT_MS, description=(
        "the attempts (poison guard) reader's fetch.wait.max.ms. A worker that is assigned a partition "
        "reads the attempts topic to its end before it serves it; Tansu 0.6.0 holds a fetch its whole "
        "wait, so there the wait can delay that catch-up. Kafka answers as soon as records arrive: "
        "500 costs nothing there and spares the broker ~8 of its ~10 empty fetches a second per worker"))

    @property
    def prefetch(self) -> int:
        """A paused partition resumes at half this, still holding a full engine's worth: the
        engine keeps busy while the next fetch is on its way (a fetch can take fetch.wait.max.ms)."""
        return self.prefetch_per_partition or 2 * (self.max_num_seqs + self.engine_queue)

    @property
    def read_ahead(self) -> int:
        """Per-partition ceiling of the buffer: never below ``prefetch``."""
        return max(self.read_ahead_per_partition, self.prefetch)

    def model_dir_default(self) -> Path:
        return self.state_dir / "tiny-model"
