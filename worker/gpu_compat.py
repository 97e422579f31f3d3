"""Work around vLLM versions that cannot run on a MIG instance addressed by UUID.

CUDA addresses a MIG slice only by UUID (``CUDA_VISIBLE_DEVICES=MIG-...``), but vLLM's
``Platform.device_id_to_physical_device_id`` does ``int()`` on each entry and crashes
(vllm-project/vllm#41848). When that happens we wrap it: a non-integer entry maps to the
parent GPU's index (``TIERQ_PARENT_GPU_INDEX``, set by the launcher) so vLLM's NVML
queries address the right physical GPU. The engine-core subprocess inherits the patch
because the worker then asks vLLM to fork, not spawn. In containers the simpler route
is ``NVIDIA_VISIBLE_DEVICES=MIG-...``, which makes the slice device 0 and needs no patch.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

log = structlog.get_logger("tierq.gpu")


def visible_mig_uuid(env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    entries = [e.strip() for e in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return next((e for e in entries if e.startswith("MIG-")), None)


def parses_uuid(platform: Any) -> bool:
    """Does ``platform.device_id_to_physical_device_id(0)`` survive the current environment?"""
    try:
        platform.device_id_to_physical_device_id(0)
        return True
    except ValueError:
        return False


def patch_platform(platform: Any, parent_index: int) -> None:
    """Make non-integer CUDA_VISIBLE_DEVICES entries resolve to ``parent_index``."""
    original = platform.device_id_to_physical_device_id

    def device_id_to_physical_device_id(device_id: int) -> int:
        try:
            return original(device_id)
        except ValueError:
            return parent_index

    platform.device_id_to_physical_device_id = staticmethod(device_id_to_physical_device_id)


def prepare_for_mig() -> bool:
    """Apply the workaround if this process targets a MIG UUID and vLLM needs it."""
    mig = visible_mig_uuid()
    if mig is None:
        return False
    from vllm.platforms import interface

    if parses_uuid(interface.Platform):
        return False
    parent = int(os.environ.get("TIERQ_PARENT_GPU_INDEX", "0"))
    patch_platform(interface.Platform, parent)
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    log.warning("vllm_mig_workaround", mig=mig, parent_gpu=parent,
                note="this vLLM cannot parse MIG UUIDs in CUDA_VISIBLE_DEVICES; patched for this process")
    return True
