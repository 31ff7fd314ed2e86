"""Memory planning: how many samples a training forward may hold on a device, and what to say when
it ran out.

A train step's device memory is a part that does not grow with the batch (weights, gradients,
AdamW's two moments, the EMA copy, bf16 copies of the weights under autocast, workspaces) and a part
that does: the activations autograd saves for the backward. The second is traced, not estimated:
one forward of the real training loss runs under FakeTensorMode (tensors with shapes and dtypes but
no memory), and saved_tensors_hooks add up every distinct storage autograd keeps. SiT-XL/2 traces
in seconds on any CPU, so a plan needs no GPU; each (config, precision) is traced once a process.

The trace runs with the CPU's autocast and kernels, standing for CUDA's: both autocasts cast the
linears, the patch convolution and attention of this network to bf16 (the layer norms see the fp32
residual stream either way), and the CPU's flash attention saves what CUDA's flash kernel saves
(queries, keys, values, output, logsumexp). Not yet checked against a GPU's allocator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks

from model.configs import SiTConfig
from model.interpolants import interpolant
from model.network import SiT
from model.objectives import training_loss
from sitctl.errors import SitctlError
from sitctl.hardware import autocast

GiB = 2**30

# fp32 weights, gradients, AdamW's first and second moments and the EMA's weights: 5 x 4 bytes.
BYTES_PER_PARAMETER = 20

# What torch allocates on a GPU outside the tensors counted here: cuBLAS and cuDNN workspaces and
# NCCL's buffers. The CUDA context itself is already missing from mem_get_info's free figure (the
# call creates it). An allowance, not a measurement.
WORKSPACE_BYTES = 1 * GiB

# Share of free memory a plan leaves unused, for what the trace does not see: the backward's
# temporaries (the gradients of one block's activations at a time: a few per cent of the saved total
# at XL/2's 28 blocks), the caching allocator's fragmentation, and REPA's projector, encoder and
# features (about 1% of XL/2's activations). A margin chosen to cover those, not measured on a GPU.
HEADROOM = 0.10


# ---------------------------------------------------------------------------------------------
# Tracing what autograd saves
# ---------------------------------------------------------------------------------------------


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage()._cdata  # the storage's own address: shared by all its views


def bytes_saved_for_backward(forward: Callable[[], object], kept: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `forward()` runs, less
    those of `kept` (tensors that live whatever the batch: the parameters, counted by static_bytes).

    A saved view keeps its whole storage alive (a chunk of the adaLN output, one of q, k, v), so
    each storage counts once, at its full size.
    """
    skipped = {_storage_key(tensor) for tensor in kept}
    saved: dict[int, Tensor] = {}  # held until the end, so that no address is reused by a new storage

    def pack(tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in skipped:
            saved[key] = tensor
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(tensor.untyped_storage().nbytes() for tensor in saved.values())


def _training_forward(net: SiT, batch: int, precision: str) -> Callable[[], Tensor]:
    """One forward of train_step's loss at `batch` samples (sitctl/train.py): the loss under autocast,
    its mean in fp32. The interpolant only adds a few (N, C, H, W) tensors; the linear one stands for all."""
    config = net.config
    shape = (batch, config.in_channels, config.input_size, config.input_size)
    x1, x0, t = torch.randn(shape), torch.randn(shape), torch.rand(batch)
    y = torch.zeros(batch, dtype=torch.long)

    def forward() -> Tensor:
        with autocast("cpu", precision):
            loss = training_loss(net, x1, y, interp=interpolant("linear"), t=t, x0=x0)
        return loss.float().sum() / batch

    return forward


def _saved_bytes(net: SiT, batch: int, precision: str) -> int:
    return bytes_saved_for_backward(_training_forward(net, batch, precision), kept=[*net.parameters(), *net.buffers()])


def saved_activation_bytes(model_config: SiTConfig, batch: int, precision: str) -> int:
    """Bytes autograd saves for the backward in one training forward of SiT(model_config) at `batch`
    samples under `precision` (bf16: autocast), the parameters left out; traced without memory."""
    with FakeTensorMode():
        return _saved_bytes(SiT(model_config), batch, precision)


# ---------------------------------------------------------------------------------------------
# A model's footprint
# ---------------------------------------------------------------------------------------------


def static_bytes(num_parameters: int, workspace: int = WORKSPACE_BYTES) -> int:
    """Bytes a training run holds whatever the batch: 20 per parameter (BYTES_PER_PARAMETER) and the
    workspace allowance."""
    return BYTES_PER_PARAMETER * num_parameters + workspace


@dataclass(frozen=True)
class Footprint:
    """A model's training memory at one precision, in bytes: `static + micro_batch * per_sample`."""

    parameters: int
    per_sample: int  # activations saved for the backward, per sample of a micro-batch
    saved_constant: int  # saved whatever the batch: under bf16, autocast's bf16 copy of every weight

    @property
    def static(self) -> int:
        return static_bytes(self.parameters) + self.saved_constant

    def at(self, micro_batch: int) -> int:
        return self.static + micro_batch * self.per_sample


@functools.cache
def footprint(model_config: SiTConfig, precision: str) -> Footprint:
    """The traced Footprint of SiT(model_config) under `precision`, once per process.

    Per sample: what batch 2 saves less what batch 1 saves, which removes what does not grow."""
    with FakeTensorMode():
        net = SiT(model_config)
        one, two = (_saved_bytes(net, batch, precision) for batch in (1, 2))
        parameters = sum(parameter.numel() for parameter in net.parameters())
    return Footprint(parameters=parameters, per_sample=two - one, saved_constant=2 * one - two)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def plan_micro_batch_to_fit(share: int, per_sample: int, static: int, free_bytes: int, *,
                            headroom: float = HEADROOM, where: str = "the device") -> int:
    """The largest divisor of a rank's `share` whose footprint, static + micro x per_sample bytes, fits
    in `free_bytes` less the headroom; a SitctlError naming what does not fit when not even 1 does."""
    usable = (1 - headroom) * free_bytes
    for micro in range(share, 0, -1):
        if share % micro == 0 and static + micro * per_sample <= usable:
            return micro
    raise SitctlError(f"one sample a micro-batch needs {(static + per_sample) / GiB:.1f} GiB "
                      f"({static / GiB:.1f} GiB of weights, gradients, optimizer state and workspace + "
                      f"{per_sample / GiB:.2f} GiB of activations), more than the {usable / GiB:.1f} GiB usable "
                      f"of {free_bytes / GiB:.1f} GiB free on {where}; use a smaller model or a larger GPU")


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA `device`: the driver's figure plus what this process's caching allocator
    holds unused (a benchmark's earlier rows leave blocks there)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def micro_batch_for_device(model_config: SiTConfig, precision: str, share: int, device: torch.device) -> int:
    """The largest divisor of `share` whose traced footprint fits the CUDA `device`'s free memory."""
    needs = footprint(model_config, precision)
    return plan_micro_batch_to_fit(share, needs.per_sample, needs.static, free_device_bytes(device), where=str(device))


def out_of_memory(micro_batch: int, device: torch.device) -> SitctlError:
    """The one line for a training step that ran out of device memory: the micro-batch to try instead."""
    size = f" ({torch.cuda.get_device_properties(device).total_memory / GiB:.1f} GiB)" if device.type == "cuda" else ""
    where = f"out of memory at micro-batch {micro_batch} on {device}{size}"
    if micro_batch == 1:
        return SitctlError(f"{where}: one sample does not fit; use a smaller model or a larger GPU")
    return SitctlError(f"{where}; pass --micro-batch {micro_batch // 2}")
