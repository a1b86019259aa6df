"""A defence entry's `build:` block: which method trains which starting checkpoint on which data,
with what optimizer, for how long (docs/defences.md)."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from trainables.attacker import Finetune, LrSchedule, Optimizer, Strict
from trainables.config import DataSource


class BuildData(Strict):
    """The defender's data, by role (defences/base.ROLES); a method names the roles it needs."""

    refusal: DataSource | None = None
    """Harmful requests answered with refusals: the alignment data."""
    harmful: DataSource | None = None
    """Harmful requests with harmful answers: the defender's copy of what an attacker trains on
    (RepNoise, Booster and TAR train against it). Keep it apart from the attack and eval splits:
    preflight names shared prompts."""
    benign: DataSource | None = None
    """Benign requests with helpful answers: utility ("retain") data."""

    def given(self) -> dict[str, DataSource]:
        return {role: src for role in ("refusal", "harmful", "benign") if (src := getattr(self, role)) is not None}


class Build(Strict):
    """How a defence is built: `method` trains `from` on `data`. Its training fields have the same
    names and meanings as the attacker's (trainables/attacker.Attacker)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)

    method: str
    """The defence method: repnoise, vaccine, booster, tar or deep (trainables/defences/)."""
    from_: str = Field(alias="from")
    """The starting checkpoint: the name of another defence of the spec (its checkpoint, built
    first when it is built too), else a local checkpoint folder or a hub id."""
    data: BuildData
    """The defender's data by role: refusal, harmful, benign."""
    domains: list[str] | None = Field(None, min_length=1)
    """Train on the harmful rows (refusal and harmful roles) of these harm domains only, read from
    each role's domain_field; benign rows are all kept. The defence is then immunised on these
    domains: its immunised_on defaults to them (the generalisation condition's in-domain attacks).
    null: every row."""
    options: dict[str, Any] = {}
    """The method's own options (each method's Options: its official defaults when left out)."""
    steps: int = Field(100, gt=0)
    """Optimizer steps."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate (after warmup)."""
    optimizer: Optimizer = "adamw"
    """As the attacker's (adamw, adam, sgd, ..., schedule_free_adamw)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for adamw), as the attacker's."""
    batch_size: int = Field(8, gt=0)
    """Rows per batch of each of the method's streams."""
    finetune: Finetune | None = None
    """lora or full; null: where the method's official code trains (its official_finetune)."""
    lora_r: int = Field(8, gt=0)
    """LoRA rank (finetune lora)."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    lora_target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or 'all-linear'. The adapters are merged into the weights when the
    build ends: the result is a plain checkpoint."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to learning_rate over this many steps."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warmup as a share of the build's steps (the longer of the two applies)."""
    lr_schedule: LrSchedule = "constant"
    """constant, linear, cosine or sgdr over the build's steps, as the attacker's."""
    sgdr_period: int = Field(0, ge=0)
    """SGDR restart period in steps (lr_schedule sgdr); 0 = a quarter of the steps."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm; 0 turns clipping off."""
    seed: int = 0
    """Seeds LoRA's initialisation, the batch order and any noise the method draws."""

    @model_validator(mode="after")
    def _known_method(self) -> Build:
        from trainables.defences import method_class

        cls = method_class(self.method)   # ValueError naming the methods there are
        try:
            cls.Options.model_validate(self.options)
        except Exception as err:  # noqa: BLE001 - rephrased by the spec loader (one line per problem)
            raise _OptionsError(cls, err) from None
        given = self.data.given()
        if self.domains:
            for role in ("refusal", "harmful"):
                if role in given and not given[role].domain_field:
                    raise ValueError(f"data.{role}.domain_field: build.domains picks rows by harm domain; name "
                                     "the field that holds each row's domain (e.g. domain_field: category)")
        if missing := [role for role in cls.needs if role not in given]:
            raise ValueError(f"data.{missing[0]}: method {self.method} needs {'/'.join(cls.needs)} data and has no "
                             f"{missing[0]} split; add data.{missing[0]}: {{source: FILE}}")
        return self

    @property
    def mode(self) -> Finetune:
        """LoRA or full: finetune, else the method's official choice."""
        from trainables.defences import method_class

        return self.finetune or method_class(self.method).official_finetune

    def training(self) -> Build:
        """This block with `finetune` resolved (what checkpoint.make_trainable and optim read)."""
        return self.model_copy(update={"finetune": self.mode})

    def method_options(self) -> Any:
        """The method's Options, defaults filled in."""
        from trainables.defences import method_class

        return method_class(self.method).Options.model_validate(self.options)


class _OptionsError(ValueError):
    """An option the method refuses, phrased as options.<field>: <problem>."""

    def __init__(self, cls: type, err: Exception):
        from pydantic import ValidationError

        from trainables.messages import explain, field_at

        if isinstance(err, ValidationError):
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                allowed = ", ".join(cls.Options.model_fields) or "none"
                msg = f"unknown option of {cls.name} (allowed options: {allowed})"
            else:
                msg = explain(first, field_at(cls.Options, first["loc"]))
            super().__init__(f"options.{field}: {msg}")
        else:
            super().__init__(f"options: {err}")
