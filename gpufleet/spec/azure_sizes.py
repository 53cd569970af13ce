"""The Azure GPU size catalog: what each supported VM size has, and how a GPU request picks one.

Data with types, in one place: the spec's validation (`gpufleet.spec.azure`) resolves a host's
`gpu: {model: h100, count: 1}` or `size: Standard_NC40ads_H100_v5` here, the Pulumi program
(`infra/azure/`) takes the size name and GPU facts from the result, and the policy tests check
the program against it.

    size = find_size("Standard_NV36ads_A10_v5")
    smallest_size("h100", count=1).name      # 'Standard_NC40ads_H100_v5'

Sources (each row below names its page):
- NCasT4_v3: https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/ncast4v3-series
- NVadsA10_v5: https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/nvadsa10v5-series
- NCads_H100_v5: https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/ncadsh100v5-series
- ND_H100_v5: https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/ndh100v5-series
  The four pages' tables (vCPUs, memory, temp storage, max data disks, GPUs and GPU memory,
  the A10 partitions, Gen1/Gen2 support) were read in their source, MicrosoftDocs/azure-docs
  articles/virtual-machines/sizes/gpu-accelerated/*.md (mid-2024 revisions).
- Driver family: Azure's NVIDIA GPU driver extension selects GRID for the whole NVadsA10_v5
  series and CUDA (datacenter) drivers for NCasT4_v3 (its resource list,
  https://github.com/Azure/azhpc-extensions NvidiaGPU/Nvidia-GPU-Linux-Resources.json,
  `DefaultSelectionsPerVMFamily`); AKS says the same of NVads_A10_v5 ("require NVIDIA GRID vGPU
  guest drivers instead of standard CUDA drivers", Azure/AgentBaker pull request 7986). The
  A10 v5 GPUs are GPU-P partitions even at full size, so the datacenter driver does not drive
  them.
- Secure Boot: "Installation of the GRID driver requires secure boot to be disabled for Linux
  VMs"; "Installation of the CUDA driver on Secure Boot enabled Ubuntu VMs requires additional
  steps" (Ubuntu's signed modules) - Trusted launch, the notes under "Virtual machines sizes":
  https://learn.microsoft.com/azure/virtual-machines/trusted-launch (read in its source,
  MicrosoftDocs/azure-docs articles/virtual-machines/trusted-launch.md, 2023 revisions; their
  size table lists NCasT4_v3 and NVadsA10 v5 but predates the H100 series, whose Trusted
  Launch support was not verified here).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

GpuFamily = Literal["t4", "a10", "h100"]
# datacenter: NVIDIA's data center (CUDA) driver, which ansible/roles/nvidia_driver installs and
# which Ubuntu ships signed for Secure Boot. grid: NVIDIA's GRID (vGPU guest) driver, from
# Microsoft's download, unsigned: Secure Boot must be off.
DriverFamily = Literal["datacenter", "grid"]
VmGeneration = Literal[1, 2]
DRIVERS_WITHOUT_SECURE_BOOT: frozenset[DriverFamily] = frozenset({"grid"})

_T4 = "https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/ncast4v3-series"
_A10 = "https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/nvadsa10v5-series"
_NC_H100 = (
    "https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/ncadsh100v5-series"
)
_ND_H100 = (
    "https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/ndh100v5-series"
)


@dataclass(frozen=True)
class GpuSize:
    """One Azure VM size with NVIDIA GPUs, as its Microsoft Learn page describes it."""

    name: str
    series: str
    family: GpuFamily
    gpu_model: str
    # Devices the guest sees (nvidia-smi lists a GPU-P partition as one device).
    gpu_count: int
    # Share of one physical GPU per device: 1 for whole GPUs, 1/6 for the smallest A10 v5.
    gpu_share: Fraction
    gpu_memory_gib: int  # all devices together
    vcpus: int
    memory_gib: int
    temp_storage_gib: int  # the local (temporary) disk: wiped on deallocation and eviction
    local_nvme: bool  # the temp storage is direct-attached NVMe (scratch for model files)
    nvswitch: bool
    infiniband_gbps_per_gpu: int  # 0: none
    generations: frozenset[VmGeneration]
    driver_family: DriverFamily
    max_data_disks: int
    source: str

    @property
    def fractional(self) -> bool:
        return self.gpu_share < 1

    @property
    def secure_boot_allowed(self) -> bool:
        return self.driver_family not in DRIVERS_WITHOUT_SECURE_BOOT

    def describe(self) -> str:
        """`Standard_NV12ads_A10_v5 (1/3 of an NVIDIA A10, 8 GiB)`."""
        if self.fractional:
            gpus = f"{self.gpu_share} of an {self.gpu_model}"
        else:
            gpus = f"{self.gpu_count}x {self.gpu_model}"
        return f"{self.name} ({gpus}, {self.gpu_memory_gib} GiB)"


_GEN_1_2: frozenset[VmGeneration] = frozenset({1, 2})
_GEN_2: frozenset[VmGeneration] = frozenset({2})


def _t4(name: str, vcpus: int, memory: int, temp: int, gpus: int, data_disks: int) -> GpuSize:
    # NCasT4_v3: NVIDIA T4 16 GB each, AMD EPYC 7V12; Gen1 and Gen2; no InfiniBand. [_T4]
    return GpuSize(
        name=name,
        series="NCasT4_v3",
        family="t4",
        gpu_model="NVIDIA T4",
        gpu_count=gpus,
        gpu_share=Fraction(1),
        gpu_memory_gib=16 * gpus,
        vcpus=vcpus,
        memory_gib=memory,
        temp_storage_gib=temp,
        local_nvme=False,
        nvswitch=False,
        infiniband_gbps_per_gpu=0,
        generations=_GEN_1_2,
        driver_family="datacenter",
        max_data_disks=data_disks,
        source=_T4,
    )


def _nc_h100(name: str, vcpus: int, memory: int, temp: int, gpus: int, data_disks: int) -> GpuSize:
    # NCads_H100_v5: H100 NVL 94 GB each, AMD EPYC Genoa; Gen2 only; no NVSwitch (the 80-vCPU
    # size's pair is NVLink-bridged); NVMe temp storage. [_NC_H100]
    return GpuSize(
        name=name,
        series="NCads_H100_v5",
        family="h100",
        gpu_model="NVIDIA H100 NVL",
        gpu_count=gpus,
        gpu_share=Fraction(1),
        gpu_memory_gib=94 * gpus,
        vcpus=vcpus,
        memory_gib=memory,
        temp_storage_gib=temp,
        local_nvme=True,
        nvswitch=False,
        infiniband_gbps_per_gpu=0,
        generations=_GEN_2,
        driver_family="datacenter",
        max_data_disks=data_disks,
        source=_NC_H100,
    )


def _a10(
    name: str, vcpus: int, memory: int, temp: int, share: Fraction, gpus: int, data_disks: int
) -> GpuSize:
    # NVadsA10_v5: NVIDIA A10 24 GiB, partitioned by GPU-P from 1/6 up; Gen1 and Gen2; GRID
    # driver for every size (see the module's sources). [_A10]
    return GpuSize(
        name=name,
        series="NVadsA10_v5",
        family="a10",
        gpu_model="NVIDIA A10",
        gpu_count=gpus,
        gpu_share=share,
        gpu_memory_gib=int(24 * share * gpus),
        vcpus=vcpus,
        memory_gib=memory,
        temp_storage_gib=temp,
        local_nvme=False,
        nvswitch=False,
        infiniband_gbps_per_gpu=0,
        generations=_GEN_1_2,
        driver_family="grid",
        max_data_disks=data_disks,
        source=_A10,
    )


CATALOG: tuple[GpuSize, ...] = (
    # NCasT4_v3 [_T4]: vCPUs, GiB memory, GiB temp storage, T4s, max data disks.
    _t4("Standard_NC4as_T4_v3", 4, 28, 176, 1, 8),
    _t4("Standard_NC8as_T4_v3", 8, 56, 352, 1, 16),
    _t4("Standard_NC16as_T4_v3", 16, 110, 352, 1, 32),
    _t4("Standard_NC64as_T4_v3", 64, 440, 2816, 4, 32),
    # NVadsA10_v5 [_A10]: vCPUs, GiB memory, GiB temp storage, GPU partition, devices, disks.
    _a10("Standard_NV6ads_A10_v5", 6, 55, 180, Fraction(1, 6), 1, 4),
    _a10("Standard_NV12ads_A10_v5", 12, 110, 360, Fraction(1, 3), 1, 4),
    _a10("Standard_NV18ads_A10_v5", 18, 220, 720, Fraction(1, 2), 1, 8),
    _a10("Standard_NV36ads_A10_v5", 36, 440, 1440, Fraction(1), 1, 16),
    _a10("Standard_NV36adms_A10_v5", 36, 880, 2880, Fraction(1), 1, 32),
    _a10("Standard_NV72ads_A10_v5", 72, 880, 2880, Fraction(1), 2, 32),
    # NCads_H100_v5 [_NC_H100]: vCPUs, GiB memory, GiB temp storage, GPUs, data disks;
    # "Generation 1 VMs: Not Supported". That the temp storage is NVMe is from NVIDIA's and
    # Azure's H100 material, not from this page's table.
    _nc_h100("Standard_NC40ads_H100_v5", 40, 320, 3576, 1, 8),
    _nc_h100("Standard_NC80adis_H100_v5", 80, 640, 7152, 2, 16),
    # ND_H100_v5 [_ND_H100]: 8 H100 (640 GB together), "NVLINK 4.0 connectivity" (the HGX
    # board's NVSwitch), "its own dedicated ... 400 Gb/s NVIDIA Quantum-2 CX7 InfiniBand
    # connection" per GPU; "Generation 1 VMs: Not Supported"; 28000 GiB temp storage (NVMe).
    GpuSize(
        name="Standard_ND96isr_H100_v5",
        series="ND_H100_v5",
        family="h100",
        gpu_model="NVIDIA H100 80GB SXM",
        gpu_count=8,
        gpu_share=Fraction(1),
        gpu_memory_gib=640,
        vcpus=96,
        memory_gib=1900,
        temp_storage_gib=28000,
        local_nvme=True,
        nvswitch=True,
        infiniband_gbps_per_gpu=400,
        generations=_GEN_2,
        driver_family="datacenter",
        max_data_disks=32,
        source=_ND_H100,
    ),
)

_BY_NAME = {size.name.lower(): size for size in CATALOG}


def find_size(name: str) -> GpuSize | None:
    """The catalog's size of that name (Azure's names are case-insensitive), or None."""
    return _BY_NAME.get(name.lower())


def similar_size_names(name: str) -> list[str]:
    """Catalog names that look like a mistyped `name`, for "did you mean" hints."""
    names = [size.name for size in CATALOG]
    lowered = {n.lower(): n for n in names}
    return [lowered[n] for n in difflib.get_close_matches(name.lower(), lowered, n=3, cutoff=0.6)]


def _cost_order(size: GpuSize) -> tuple[int, int, str]:
    # vCPUs and memory stand in for price within a family: the catalog has no prices.
    return (size.vcpus, size.memory_gib, size.name)


def matching_sizes(
    family: GpuFamily, count: int, *, allow_fraction: bool = False, min_gpu_memory_gib: int = 0
) -> list[GpuSize]:
    """Every size that satisfies the request, smallest first.

    Whole GPUs match on the exact count. A fraction (A10 v5 partitions) is one device, so it
    matches only `count: 1` with `allow_fraction`; `min_gpu_memory_gib` then picks the share.
    """
    found = [
        size
        for size in CATALOG
        if size.family == family
        and size.gpu_count == count
        and (allow_fraction or not size.fractional)
        and size.gpu_memory_gib >= min_gpu_memory_gib
    ]
    return sorted(found, key=_cost_order)


def smallest_size(
    family: GpuFamily, count: int, *, allow_fraction: bool = False, min_gpu_memory_gib: int = 0
) -> GpuSize | None:
    """The smallest size that satisfies the request, or None."""
    found = matching_sizes(
        family, count, allow_fraction=allow_fraction, min_gpu_memory_gib=min_gpu_memory_gib
    )
    return found[0] if found else None


def closest_sizes(family: GpuFamily, count: int, limit: int = 3) -> list[GpuSize]:
    """Sizes nearest to an unsatisfiable request: same family by GPU count, then others."""

    def distance(size: GpuSize) -> tuple[int, int, tuple[int, int, str]]:
        return (size.family != family, abs(size.gpu_count - count), _cost_order(size))

    return sorted(CATALOG, key=distance)[:limit]
