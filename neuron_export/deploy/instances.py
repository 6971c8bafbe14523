"""The EC2 instances an export can be deployed to: one table, each row with where its numbers come from.

Numbers are AWS's published figures (GiB), cross-checked against the AWS Neuron documentation's
architecture pages, which list the same instance sizes with chips, vCPUs, host memory and device memory:
  Inf2: https://aws.amazon.com/ec2/instance-types/inf2/ and
        https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/inf2-arch.html
  Trn1: https://aws.amazon.com/ec2/instance-types/trn1/ and
        https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trn1-arch.html
Every Inferentia2 and Trainium (first generation) chip has 2 NeuronCore-v2 and 32 GiB of device memory (HBM).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
CORES_PER_CHIP = 2  # NeuronCore-v2 per Inferentia2 / Trainium chip
INF2_SOURCE = "AWS EC2 Inf2 instance types page; AWS Neuron docs, Inf2 architecture (instance sizes table)"
TRN1_SOURCE = "AWS EC2 Trn1 instance types page; AWS Neuron docs, Trn1/Trn1n architecture (instance sizes table)"


@dataclass(frozen=True)
class Instance:
    name: str
    target: str  # the neuronx-cc --target the instance runs: inf2 or trn1
    chip: str
    chips: int
    vcpus: int
    host_memory_gib: int
    device_memory_gib: int  # all chips together
    source: str

    @property
    def neuron_cores(self) -> int:
        return self.chips * CORES_PER_CHIP

    @property
    def device_memory_per_core_bytes(self) -> int:
        """HBM is per chip; we budget each NeuronCore an equal share of its chip's memory."""
        return self.device_memory_gib * GIB // self.neuron_cores

    @property
    def host_memory_bytes(self) -> int:
        return self.host_memory_gib * GIB


INSTANCES: tuple[Instance, ...] = (
    Instance(
        "inf2.xlarge",
        "inf2",
        "Inferentia2",
        chips=1,
        vcpus=4,
        host_memory_gib=16,
        device_memory_gib=32,
        source=INF2_SOURCE,
    ),
    Instance(
        "inf2.8xlarge",
        "inf2",
        "Inferentia2",
        chips=1,
        vcpus=32,
        host_memory_gib=128,
        device_memory_gib=32,
        source=INF2_SOURCE,
    ),
    Instance(
        "inf2.24xlarge",
        "inf2",
        "Inferentia2",
        chips=6,
        vcpus=96,
        host_memory_gib=384,
        device_memory_gib=192,
        source=INF2_SOURCE,
    ),
    Instance(
        "inf2.48xlarge",
        "inf2",
        "Inferentia2",
        chips=12,
        vcpus=192,
        host_memory_gib=768,
        device_memory_gib=384,
        source=INF2_SOURCE,
    ),
    Instance(
        "trn1.2xlarge",
        "trn1",
        "Trainium",
        chips=1,
        vcpus=8,
        host_memory_gib=32,
        device_memory_gib=32,
        source=TRN1_SOURCE,
    ),
    Instance(
        "trn1.32xlarge",
        "trn1",
        "Trainium",
        chips=16,
        vcpus=128,
        host_memory_gib=512,
        device_memory_gib=512,
        source=TRN1_SOURCE,
    ),
    Instance(
        "trn1n.32xlarge",
        "trn1",
        "Trainium",
        chips=16,
        vcpus=128,
        host_memory_gib=512,
        device_memory_gib=512,
        source=TRN1_SOURCE,
    ),
)
BY_NAME = {instance.name: instance for instance in INSTANCES}


def instance_names() -> list[str]:
    return [instance.name for instance in INSTANCES]


def get_instance(name: str) -> Instance:
    from neuron_export.errors import ExportError

    instance = BY_NAME.get(name.strip().lower())
    if instance is None:
        raise ExportError(
            f"--instance {name} is not an instance type neuron-export knows; use one of {', '.join(instance_names())}."
        )
    return instance


def by_size(instances: tuple[Instance, ...] | list[Instance] = INSTANCES) -> list[Instance]:
    """Smallest first: host memory, then device memory, then vCPUs (a proxy for price)."""
    return sorted(instances, key=lambda i: (i.host_memory_gib, i.device_memory_gib, i.vcpus))
