"""Device discovery against a fake NVML, launcher planning, the vLLM MIG workaround."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tierq.cli import main
from schemas.topology import Topology
from worker.devices import GIB, Device, discover, format_table
from worker.gpu_compat import parses_uuid, patch_platform, visible_mig_uuid
from worker.launcher import default_sizing, plan


class NVMLError(Exception):
    pass


class FakeNvml:
    """GPU 0: a plain 80 GiB GPU. GPU 1: MIG mode with a 3g.40gb and a 1g.10gb instance
    (slot 1 empty). Memory of a MIG handle is the slice's own."""

    def __init__(self, gpus=None, init_error=None):
        self.gpus = gpus if gpus is not None else [
            {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa", "memory": 80 * GIB, "mig": None},
            {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-bbbb", "memory": 80 * GIB, "mig": [
                {"name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "uuid": "MIG-1111", "memory": 40 * GIB},
                None,
                {"name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "uuid": "MIG-2222", "memory": 10 * GIB},
            ]},
        ]
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle):
        return handle["name"].encode()  # old pynvml returns bytes

    def nvmlDeviceGetUUID(self, handle):
        return handle["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=handle["memory"], free=handle["memory"], used=0)

    def nvmlDeviceGetMigMode(self, handle):
        if "mig" not in handle:
            raise NVMLError("Not Supported")
        return (1, 1) if handle["mig"] is not None else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return len(handle["mig"])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index):
        mig = handle["mig"][index]
        if mig is None:
            raise NVMLError("Not Found")
        return mig


def test_discovers_gpus_and_mig_instances_with_their_own_memory():
    nvml = FakeNvml()
    found = discover(nvml)
    assert [d.label for d in found.devices] == ["gpu0", "gpu1-mig0", "gpu1-mig2"]
    gpu, big, small = found.devices
    assert gpu.kind == "gpu" and gpu.uuid == "GPU-aaaa" and gpu.memory_gib == 80
    assert big.kind == "mig" and big.profile == "3g.40gb" and big.memory_gib == 40 and big.index == 1
    assert small.profile == "1g.10gb" and small.memory_gib == 10 and small.uuid == "MIG-2222"
    assert found.note is None and nvml.shutdowns == 1
    table = format_table(found)
    assert "gpu1-mig0" in table and "3g.40gb" in table and "40.0 GiB" in table


def test_gpu_without_mig_support_is_a_plain_gpu():
    found = discover(FakeNvml(gpus=[{"name": "Tesla T4", "uuid": "GPU-t4", "memory": 16 * GIB}]))
    assert [(d.kind, d.label) for d in found.devices] == [("gpu", "gpu0")]


def test_no_driver_means_the_cpu_only_and_says_why():
    found = discover(FakeNvml(init_error=NVMLError("Driver Not Loaded")))
    assert [d.kind for d in found.devices] == ["cpu"]
    assert "no NVIDIA driver" in found.note and "Driver Not Loaded" in found.note
    assert discover(FakeNvml(gpus=[])).note.startswith("the NVIDIA driver reports no GPUs")


def test_devices_command_on_this_machine(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "cpu0" in out or "gpu0" in out
    assert main(["devices", "--json"]) == 0
    assert '"devices"' in capsys.readouterr().out


def topology(devices):
    return Topology.model_validate({
        "bands": {"high": {}, "medium": {"aging_step_s": 30}, "low": {"aging_step_s": 60}},
        "pools": {"default": {}, "tenant-acme": {}, "shared-small": {}},
        "devices": devices,
    })


def test_plan_assigns_pools_by_rule_and_sizes_from_device_memory():
    devices = discover(FakeNvml()).devices
    rules = [
        {"match": {"profile": "3g.40gb"}, "pool": "tenant-acme", "model": "/models/acme"},
        {"match": {"profile": "1g.10gb"}, "pool": "shared-small", "max_num_seqs": 4},
    ]
    specs = {s.name: s for s in plan(devices, topology(rules), host="h", metrics_port_base=9100)}
    assert {n: s.pool for n, s in specs.items()} == {
        "gpu0": "default", "gpu1-mig0": "tenant-acme", "gpu1-mig2": "shared-small"}
    acme = specs["gpu1-mig0"].env
    assert acme["CUDA_VISIBLE_DEVICES"] == "MIG-1111" and acme["TIERQ_PARENT_GPU_INDEX"] == "1"
    assert acme["TIERQ_DEVICE_MEMORY_BYTES"] == str(40 * GIB)  # the slice, not the 80 GiB parent
    assert acme["TIERQ_MAX_NUM_SEQS"] == "64" and acme["TIERQ_MODEL"] == "/models/acme"
    assert acme["TIERQ_WORKER_ID"] == "h/gpu1-mig0" and acme["TIERQ_GROUP_ID"] == "tierq-tenant-acme"
    assert specs["gpu1-mig2"].env["TIERQ_MAX_NUM_SEQS"] == "4"  # the rule wins over the default
    assert specs["gpu1-mig2"].env["TIERQ_GPU_MEMORY_UTILIZATION"] == "0.85"
    assert specs["gpu0"].env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert sorted(s.env["TIERQ_METRICS_PORT"] for s in specs.values()) == ["9100", "9101", "9102"]


def test_disabled_rule_skips_devices_and_unknown_pools_are_rejected():
    devices = discover(FakeNvml()).devices
    specs = plan(devices, topology([{"match": {"kind": "mig"}, "enabled": False}]))
    assert [s.name for s in specs] == ["gpu0"]
    with pytest.raises(ValueError, match=r"devices\.0\.pool: unknown pool 'gold'"):
        topology([{"match": {"kind": "gpu"}, "pool": "gold"}])


def test_default_sizing():
    assert default_sizing(Device(kind="cpu", name="cpu")) == (None, None)
    assert default_sizing(Device(kind="mig", name="m", memory_bytes=10 * GIB)) == (16, 0.85)
    assert default_sizing(Device(kind="gpu", name="g", memory_bytes=80 * GIB)) == (128, 0.90)


class BuggyPlatform:
    """vLLM before the fix: int() on every CUDA_VISIBLE_DEVICES entry."""

    env = {"CUDA_VISIBLE_DEVICES": "MIG-1111"}

    @classmethod
    def device_id_to_physical_device_id(cls, device_id):
        return int(cls.env["CUDA_VISIBLE_DEVICES"].split(",")[device_id])


def test_mig_workaround_maps_a_mig_uuid_to_its_parent_gpu():
    assert visible_mig_uuid({"CUDA_VISIBLE_DEVICES": "MIG-1111"}) == "MIG-1111"
    assert visible_mig_uuid({"CUDA_VISIBLE_DEVICES": "0,1"}) is None
    assert not parses_uuid(BuggyPlatform)
    patch_platform(BuggyPlatform, parent_index=1)
    assert parses_uuid(BuggyPlatform)
    assert BuggyPlatform.device_id_to_physical_device_id(0) == 1
