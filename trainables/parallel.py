"""Data-parallel training under DeepSpeed, in one process or across Ray Train workers."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainables.config import Attacker, DeepSpeed
from trainables.outcome import diverges


@dataclass(frozen=True)
class World:
    rank: int
    size: int


def process_group(device: torch.device) -> World:
    """Join the process group a launcher (Ray Train, deepspeed, torchrun) set up, or make a
    one-process group: DeepSpeed needs one even on a single device."""
    import deepspeed

    if not dist.is_initialized():
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return World(dist.get_rank(), dist.get_world_size())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(batch: dict[str, torch.Tensor], world: World, accumulation: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of a global batch: its rows (rank, rank + size, ...), cut
    into `accumulation` pieces. No two ranks share a row."""
    n = batch["input_ids"].shape[0]
    if n % (world.size * accumulation):
        raise ValueError(f"batch_size={n} does not divide over {world.size} workers x "
                         f"{accumulation} gradient-accumulation steps; pick a multiple of "
                         f"{world.size * accumulation}")
    rows = torch.arange(world.rank, n, world.size)
    return [{k: v[piece] for k, v in batch.items()} for piece in rows.chunk(accumulation)]


def precision(settings: DeepSpeed, device: torch.device) -> str:
    if settings.precision != "auto":
        return settings.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


class DataParallel:
    """Wraps a stage's model and optimizer in a DeepSpeed engine and runs its steps."""

    def __init__(self, settings: DeepSpeed, device: torch.device):
        self.settings, self.device = settings, device
        self.world = process_group(device)

    @property
    def scores_here(self) -> bool:
        return self.world.rank == 0 or self.settings.zero_stage == 3

    @property
    def synced_generation(self) -> bool:
        return self.settings.zero_stage == 3 and self.world.size > 1

    def wrap(self, model: torch.nn.Module, optimizer, scheduler, hp: Attacker):
        import deepspeed

        accumulation = self.settings.gradient_accumulation_steps
        config = {**self.settings.config, "train_batch_size": hp.batch_size,
                  "train_micro_batch_size_per_gpu": hp.batch_size // (self.world.size * accumulation),
                  "gradient_accumulation_steps": accumulation, "gradient_clipping": hp.max_grad_norm,
                  "steps_per_print": 10**9}
        zero = config.get("zero_optimization", {})
        if "offload_optimizer" in zero:  # our torch optimizer, not DeepSpeed's CPU Adam
            config["zero_force_ds_cpu_optimizer"] = False
        mode = precision(self.settings, self.device)
        if mode != "fp32":
            config[mode] = {"enabled": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)
        return engine

    def step(self, engine, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on the global batch; the loss averaged over every rank."""
        pieces = shard(batch, self.world, self.settings.gradient_accumulation_steps)
        total = 0.0
        for piece in pieces:
            loss = engine(**{k: v.to(self.device) for k, v in piece.items()}).loss
            # every rank must agree before the backward's collectives: one nan stops them all
            if diverges(self.mean(float(loss.item()))):
                return math.nan
            total += float(loss.item())
            engine.backward(loss)
            engine.step()
        return self.mean(total / len(pieces))

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world.size

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (the others pass placeholders of the same length)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.broadcast(t, src=0)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")
