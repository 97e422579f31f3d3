"""Device discovery with NVML (nvidia-ml-py): GPUs and, where MIG is on, their MIG instances.

Each device found is a place for exactly one worker process. Memory is read from the
device's own NVML handle, so a MIG instance reports its slice, not the parent GPU
(inside a MIG-restricted container NVML would show the parent's memory; the launcher
therefore passes each worker its device's memory instead of letting it ask).
With no NVIDIA driver the CPU is the only device.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Protocol

GIB = 1024**3
_MIG_PROFILE = re.compile(r"(\d+g\.\d+gb)", re.IGNORECASE)


@dataclass(frozen=True)
class Device:
    """One schedulable device. ``kind`` is gpu, mig or cpu."""

    kind: str
    name: str
    uuid: str | None = None
    index: int | None = None  # GPU index; for MIG, the parent GPU's index
    mig_index: int | None = None
    profile: str | None = None  # MIG profile, e.g. 3g.40gb
    memory_bytes: int | None = None

    @property
    def label(self) -> str:
        """Short stable name: gpu0, gpu1-mig2, cpu0."""
        if self.kind == "gpu":
            return f"gpu{self.index}"
        if self.kind == "mig":
            return f"gpu{self.index}-mig{self.mig_index}"
        return f"cpu{self.index or 0}"

    @property
    def memory_gib(self) -> float | None:
        return None if self.memory_bytes is None else self.memory_bytes / GIB

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


@dataclass(frozen=True)
class Discovery:
    devices: list[Device]
    note: str | None = None  # why only the CPU was found, when it was

    @property
    def accelerators(self) -> list[Device]:
        return [d for d in self.devices if d.kind != "cpu"]


class Nvml(Protocol):
    """The NVML calls discovery uses (pynvml's names); tests pass a fake."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int]: ...
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int: ...
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any: ...


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def cpu_only(note: str) -> Discovery:
    return Discovery([Device(kind="cpu", name="cpu", index=0)], note=note)


def load_nvml() -> Nvml | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml  # type: ignore[return-value]


def discover(nvml: Nvml | None = None) -> Discovery:
    """Every GPU, or every MIG instance of a GPU in MIG mode; the CPU when there is none."""
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return cpu_only("nvidia-ml-py (pynvml) is not installed: only the CPU is available")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # pynvml raises NVMLError subclasses (driver not loaded, library not found)
        return cpu_only(f"no NVIDIA driver ({exc}): only the CPU is available")
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            devices += _gpu_devices(nvml, index)
    finally:
        nvml.nvmlShutdown()
    if not devices:
        return cpu_only("the NVIDIA driver reports no GPUs: only the CPU is available")
    return Discovery(devices)


def _gpu_devices(nvml: Nvml, index: int) -> list[Device]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    try:
        current_mig_mode, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # GPUs without MIG support raise NotSupported
        current_mig_mode = 0
    if not current_mig_mode:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle).total
        return [Device(kind="gpu", name=name, uuid=_text(nvml.nvmlDeviceGetUUID(handle)), index=index,
                       memory_bytes=int(memory))]
    migs = []
    for mig_index in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index)
        except Exception:  # NotFound: this slot holds no instance
            continue
        mig_name = _text(nvml.nvmlDeviceGetName(mig))
        match = _MIG_PROFILE.search(mig_name)
        migs.append(Device(
            kind="mig", name=mig_name, uuid=_text(nvml.nvmlDeviceGetUUID(mig)), index=index, mig_index=mig_index,
            profile=match.group(1).lower() if match else None,
            memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(mig).total),  # the slice's own memory
        ))
    return migs


def format_table(discovery: Discovery) -> str:
    rows = [("device", "kind", "name", "profile", "memory", "uuid")]
    for d in discovery.devices:
        memory = f"{d.memory_gib:.1f} GiB" if d.memory_gib is not None else "-"
        rows.append((d.label, d.kind, d.name, d.profile or "-", memory, d.uuid or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if discovery.note:
        lines.append(f"note: {discovery.note}")
    return "\n".join(lines)
