"""What a defence method is: the defender's training objective, one module per method in this
package, run by the builder (trainables/defences/build.py) for a defence entry's `build:` block.

A method names the data roles it needs, turns their rows into item streams, and runs one
optimizer step's forward and backward passes, leaving on the trained parameters' `.grad` the
gradient the optimizer then applies. Clipping, the optimizer, the schedule, LoRA versus full
parameters, the budget and the checkpoint are the builder's, the same for every method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from trainables.attacker import Strict
from trainables.methods.base import Rates, Spent

if TYPE_CHECKING:
    import torch

    from trainables.config import Data

Role = Literal["refusal", "harmful", "benign"]
ROLES: tuple[Role, ...] = ("refusal", "harmful", "benign")
"""The data a defender trains on, each a split of prompt/response rows:
refusal: harmful requests answered with refusals (alignment data);
harmful: harmful requests with harmful answers (the defender's copy of what an attacker trains on);
benign: benign requests with helpful answers (utility, "retain" data)."""

Draw = Callable[[str, int], "dict[str, torch.Tensor]"]
"""draw(stream, i): the i-th batch of one of the method's streams (a data.BatchStream over the
stream's items, seeded, batch_size items each). Batch i depends on (seed, i) alone."""


class Options(Strict):
    """A method's options (the `build.options` block): frozen, unknown keys refused, each field
    documented with its official default and range."""


@dataclass(frozen=True)
class Step:
    """What one optimizer step of a defence did."""

    terms: dict[str, float]
    """Each named term of the objective at this step (e.g. {"refusal_ce": .., "noise": ..}),
    and "loss": what the update minimised, as the method defines it; logged per step."""
    spent: Spent
    """What its passes spent, in the budget's units: examples (rows of every batch drawn, repeats
    included), tokens (supervised tokens the losses read), FLOPs (every forward and backward pass:
    rates.train per token of a pass with a backward, rates.forward per token of a forward alone,
    padding excluded)."""


class DefenceMethod(Protocol):
    """One defence method (a class per module). Built once per build with its options."""

    name: ClassVar[str]
    """Its name in `build.method`."""
    Options: ClassVar[type[Options]]
    """Its options model; the spec validates `build.options` against it."""
    needs: ClassVar[tuple[Role, ...]]
    """The data roles it cannot run without: a build whose data lacks one is a spec error."""
    uses: ClassVar[tuple[Role, ...]]
    """The data roles it reads when given (a superset of `needs`)."""
    official_finetune: ClassVar[str]
    """Where its official code trains, "lora" or "full": the build's default. Every method runs
    under both; a build that picks the other says so in its record."""

    def __init__(self, options: Options, model: torch.nn.Module, rates: Rates, seed: int) -> None:
        """`model`: what is trained (PEFT-wrapped under LoRA), already on its device, before any step
        (a method that needs the starting weights as a frozen reference takes them here:
        methods.reference.Reference)."""

    def streams(self, rows: dict[Role, list[dict[str, str]]], tokenizer: Any, data: Data) -> dict[str, list]:
        """Its item streams from the rows of each role given ({"prompt", "response"} dicts, in file
        order): stream name -> items. Prompts are formatted with data (chat template, system prompt)
        and cut at data.max_length, as the attack's are (trainables.data)."""

    def collate(self, stream: str, items: list, pad_id: int) -> dict[str, torch.Tensor]:
        """One batch of a stream's items."""

    def step(self, model: torch.nn.Module, draw: Draw, index: int) -> Step:
        """Optimizer step `index` (0-based): its passes, leaving the update's gradient in `.grad`
        of the trained parameters (zeroed by the builder before the call). Batches come from
        draw(stream, i); a method that takes one batch per stream per step uses i = index."""
