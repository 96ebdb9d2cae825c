"""Several processes, one model: data-parallel training with PyTorch's own distributed engine.

    torchrun --nproc_per_node 4 -m minisft.train --dataset_name data.jsonl ...

torchrun starts one process per GPU (or per CPU slot) and tells each its RANK and the
WORLD_SIZE. Every process holds the model, trains on its own share of each step's examples,
and the gradients are averaged across processes before the optimizer step, so all processes
take the same step:

    step s, global batch = world_size × per_device_train_batch_size × gradient_accumulation_steps
      rank 0: micro-batches 0, N, 2N, ...      forward, backward (no sync until the last one)
      rank 1: micro-batches 1, N+1, ...        ...
      then   all-reduce the gradients (DDP), or reduce-scatter them into shards (FSDP2)

The loss keeps its meaning: Σ token losses over the *whole* step / trained tokens of the whole
step. Each process counts its trained tokens, the counts are summed across processes (one
all-reduce per step), and since DDP and FSDP average the gradients over N processes, each
process scales its loss by N. So N processes with batch b take the step that one process
takes with batch N·b.

- DDP (the default with several processes) keeps a full copy of the weights and of AdamW's
  state in every process.
- FSDP2 (`--fsdp`, torch's fully_shard) shards weights, gradients and optimizer state across
  processes, each decoder layer gathered only while it computes: for models too big for one
  device.

LoRA and QLoRA under FSDP2. LoRA's layers are injected first, then each decoder layer is one
FSDP unit holding its frozen base weights and its trained A and B together. That mix is what
breaks naive FSDP1 wrapping: FSDP1 flattens a unit's parameters into one FlatParameter with one
requires_grad (use_orig_params=True lifts this at a memory cost), so peft's and answer.ai's
fsdp_qlora recipes wrap every trained Linear as a unit of its own. FSDP2 shards each parameter
on its own, as a DTensor cut along its first dimension: a unit may mix frozen and trained
parameters, and the reduce-scatter carries only the gradients that exist (A's and B's). So the
wrapping stays one unit per layer, the granularity that overlaps communication with compute.
A 4-bit QLoRA base is sharded the same way: its packed codes are a parameter like any other
(uint8, or --bnb_4bit_quant_storage's dtype: FSDP2 gathers mixed dtypes), and bitsandbytes keeps
each layer's quantization state on the module, so the gathered codes dequantize again. At the
end only the adapter is gathered to rank 0 and written in peft's format (whole_weights below).

Only rank 0 prints, logs and writes files; in checkpoints every rank saves its own random state,
and under FSDP its own shards (minisft/machinery/checkpoint.py).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from minisft.errors import UserError
from minisft.sft.lora import LoraSettings

from .peft_files import adapter_state_dict


class DistributedError(UserError, RuntimeError):
    """A distributed setting that cannot work here."""


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start() -> Processes:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); one process: nothing to join."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    processes = Processes(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(processes.local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return processes


def device_of(processes: Processes) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", processes.local_rank)
    return torch.device("cpu")


def stop(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


class Backbone(nn.Module):
    """The model without its output head: what DDP and FSDP wrap.

    minisft's loss applies the head itself, chunk by chunk, to the trained positions only
    (minisft/sft/loss.py), so the wrapped forward must stop at the last hidden states. The head's
    weight is still a parameter of this module, so its gradient is synchronised like the others.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model.base_model(**inputs)


@dataclass(frozen=True)
class DataParallel:
    """What the loop needs to know of the other processes, the same calls with one process or many.

    mine(micro_batches)   this process's share of a step, with weights (0: a padding repeat)
    sum(values)           element-wise sums over all processes (one all-reduce)
    sync(last)            gradients communicated only after the step's last micro-batch
    gradient_scale        N: DDP and FSDP average the N processes' gradients; × N makes it a sum
    backbone(**inputs)    the forward pass to the last hidden states (wrapped under torchrun)
    """

    processes: Processes
    backbone: nn.Module  # model.base_model, or a DDP- or FSDP2-wrapped Backbone
    device: torch.device

    @property
    def gradient_scale(self) -> int:
        return self.processes.world_size

    def mine(self, micro_batches: list) -> list[tuple[list, float]]:
        """This process's micro-batches of a step (every world_size-th), weight 1, padded with weight-0 repeats.

        At the end of an epoch a step can have fewer micro-batches than processes × accumulation. Every
        process must still run as many forward and backward passes as the others (the gradient
        synchronisation waits for all of them), so a process short of data repeats one micro-batch
        with its loss multiplied by 0: it adds nothing to the gradient and is not counted.
        """
        rank, world_size = self.processes.rank, self.processes.world_size
        mine = micro_batches[rank::world_size]
        padding = math.ceil(len(micro_batches) / world_size) - len(mine)
        return [(batch, 1.0) for batch in mine] + [(micro_batches[0], 0.0)] * padding

    @property
    def sharded(self) -> bool:
        """FSDP2: every process holds a shard of each weight (a DTensor), not the whole model."""
        return isinstance(self.backbone, FSDPModule)

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over all processes (the values themselves with one process)."""
        if not self.processes.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    @contextmanager
    def sync(self, last: bool):
        """Accumulate without communicating on all micro-batches but the step's last one."""
        if last or not self.processes.distributed:
            yield
        elif isinstance(self.backbone, nn.parallel.DistributedDataParallel):
            with self.backbone.no_sync():
                yield
        else:  # FSDP2: the reduce-scatter waits for the last micro-batch
            self.backbone.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.backbone.set_requires_gradient_sync(True)


def data_parallel(model: nn.Module, processes: Processes, fsdp: bool) -> DataParallel:
    """One process: the model's own backbone. Under torchrun: the Backbone wrapped in DDP or FSDP2."""
    device = device_of(processes)
    if not processes.distributed:  # --fsdp outside torchrun is refused with the flags (config.check_run)
        return DataParallel(processes, model.base_model, device)
    backbone = Backbone(model)
    if not fsdp:
        device_ids = [processes.local_rank] if torch.cuda.is_available() else None
        return DataParallel(processes, nn.parallel.DistributedDataParallel(backbone, device_ids=device_ids), device)
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        name = type(model).__name__
        raise DistributedError(f"--fsdp: minisft shards the decoder layers in `model.layers`; {name} has none.")
    for layer in layers:
        fully_shard(layer)
    return DataParallel(processes, fully_shard(backbone), device)


def whole_weights(model: nn.Module, lora: LoraSettings | None) -> dict[str, torch.Tensor]:
    """Under FSDP, the weights to write, gathered from every process's shards: the whole model's, or with
    LoRA only the adapter's (a small gather, the frozen base stays sharded). Every process must call this,
    in step: each gather is a collective; rank 0 writes.
    """
    if lora is not None:
        return {name: tensor.full_tensor() for name, tensor in adapter_state_dict(model, lora).items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied head comes back as a second copy of the embedding: keep each parameter once, under its first name,
    # as save_pretrained does for an unsharded model.
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in names}
