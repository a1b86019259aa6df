"""The attacker's fine-tuning across its stages, one step at a time, and replayable."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from trainables import data as D
from trainables.budget import Budget
from trainables.config import Attacker, Stage
from trainables.methods import Method, Rates, sft
from trainables.optim import build_optimizer, build_scheduler
from trainables.outcome import diverges
from trainables.parallel import DataParallel


@dataclass
class Snapshot:
    """CPU copy of the training state after `step` global steps."""

    stage: int
    local: int
    """Steps taken in that stage: the index of the next batch in its stream."""
    budget: Budget
    params: list[torch.Tensor]
    """The trainable parameters (all weights, or only the LoRA adapters)."""
    optimizer: dict | None
    """None at a stage's end, where the next stage builds a fresh optimizer anyway."""
    scheduler: dict | None
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    samplers: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    """Per method, its own sampling generator's state (GRPO's rollouts); None for the others."""

    @property
    def step(self) -> int:
        return self.budget.steps


def _cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU, so later in-place updates on the device
    (or on CPU, where load_state_dict would keep our tensors) never reach the copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class Trainer:
    """Trains `model` through `stages`, batch i of stage s being streams[s][i], its loss and
    budget those of methods[s] (trainables/methods/)."""

    def __init__(self, model: torch.nn.Module, attacker: Attacker, stages: list[Stage],
                 streams: list[D.BatchStream], methods: list[Method], rates: Rates, device: torch.device,
                 devices: int = 1, parallel: DataParallel | None = None):
        self.parallel = parallel
        """Set: each step runs on a DeepSpeed engine, the global batch split across workers (SFT only)."""
        self.model, self.attacker, self.stages, self.streams = model, attacker, stages, streams
        self.methods, self.rates, self.device, self.devices = methods, rates, device, devices
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.budget = Budget()
        self.trained_steps = 0
        """Optimizer steps actually run, replays included: what refinement cost us."""
        self.losses: list[float] = []
        self.first_loss = math.nan
        """The loss of the first step, taken before any update: where the attack started."""
        self.peak_loss = math.nan
        """The largest finite step loss so far (replays included)."""
        self._enter(0)

    def _enter(self, index: int) -> None:
        """Start stage `index`: a fresh optimizer, and a schedule spanning the stage's steps."""
        self.index, self.local = index, 0
        self.hp = self.stages[index].resolved(self.attacker)
        self.optimizer = build_optimizer(self.trainable, self.hp)
        self.scheduler = build_scheduler(self.optimizer, self.hp, self.stages[index].steps)
        if self.parallel is not None:
            self.engine = self.parallel.wrap(self.model, self.optimizer, self.scheduler, self.hp)

    def train_to(self, step: int) -> float | None:
        """Train up to global step `step`, moving into later stages as their turn comes.
        Returns the loss if it diverged (outcome.diverges: nan/inf; that step still counts), else None."""
        start = time.perf_counter()
        try:
            while self.budget.steps < step:
                if self.local == self.stages[self.index].steps:
                    self._enter(self.index + 1)
                loss = self._step()
                if diverges(loss):
                    return loss
            return None
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # queued kernels are training time, not evaluation's
            self.budget.add_time(time.perf_counter() - start, self.devices)

    def _step(self) -> float:
        batch = self.streams[self.index][self.local]  # the global batch: budgets count all of it
        self.local += 1
        self.trained_steps += 1
        if self.parallel is not None:
            self.budget.spend(sft.spent(batch, self.rates.train))
            loss = self.parallel.step(self.engine, batch)
            if not diverges(loss):
                self._note(loss)
            return loss

        loss, spent = self.methods[self.index].loss(self.model, batch, self.device)
        self.budget.spend(spent)
        value = float(loss.item())
        if diverges(value):  # its gradient would make every weight nan: no update
            return value
        loss.backward()
        if self.hp.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._note(value)
        return value

    def _note(self, loss: float) -> None:
        self.losses.append(loss)
        if math.isnan(self.first_loss):
            self.first_loss = loss
        self.peak_loss = loss if math.isnan(self.peak_loss) else max(self.peak_loss, loss)

    def loss_peak_ratio(self) -> float:
        """The largest step loss over the first one (nan before any step, or from a zero loss, or
        where a stage's method's loss is no error whose peak means anything: Method.loss_is_error)."""
        if not all(m.loss_is_error for m in self.methods):
            return math.nan
        return self.peak_loss / self.first_loss if self.first_loss > 0 else math.nan

    def mean_loss(self) -> float:
        """Mean training loss since the last call (nan if no step was taken)."""
        mean = sum(self.losses) / len(self.losses) if self.losses else math.nan
        self.losses.clear()
        return mean

    def mean_reward(self) -> float | None:
        """Mean reward of the sampled answers since the last call (methods that sample them,
        GRPO); None where no such step was taken."""
        rewards = [r for m in dict.fromkeys(self.methods) if hasattr(m, "mean_reward")
                   if (r := m.mean_reward()) is not None]
        return sum(rewards) / len(rewards) if rewards else None

    def snapshot(self) -> Snapshot:
        """The state now; take it with schedule-free optimizers in train mode (after evaluating)."""
        at_end = self.local == self.stages[self.index].steps
        return Snapshot(
            stage=self.index, local=self.local, budget=dataclasses.replace(self.budget),
            params=[p.detach().to("cpu", copy=True) for p in self.trainable],
            optimizer=None if at_end else _cpu_copy(self.optimizer.state_dict()),
            scheduler=None if at_end else copy.deepcopy(self.scheduler.state_dict()),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            samplers=[g.get_state() if (g := getattr(m, "generator", None)) is not None else None
                      for m in self.methods],
        )

    def restore(self, snap: Snapshot) -> None:
        """Go back to `snap`; the snapshot stays valid for another restore."""
        self._enter(snap.stage)
        self.local = snap.local
        with torch.no_grad():
            for p, saved in zip(self.trainable, snap.params, strict=True):
                p.copy_(saved)
        if snap.optimizer is not None:
            self.optimizer.load_state_dict(_cpu_copy(snap.optimizer))
            self.scheduler.load_state_dict(copy.deepcopy(snap.scheduler))
        torch.set_rng_state(snap.rng)
        if snap.cuda_rng is not None:
            torch.cuda.set_rng_state_all(snap.cuda_rng)
        for method, state in zip(self.methods, snap.samplers, strict=False):
            if state is not None:
                method.generator.set_state(state)
        self.budget = dataclasses.replace(snap.budget)
        self.losses.clear()
        self.mean_reward()
