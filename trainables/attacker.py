"""The attacker's knobs, each declared once: the search space of a sweep is derived from
Attacker's fields."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Optimizer = Literal["adamw", "adam", "sgd", "sgd_momentum", "sgd_nesterov", "adagrad", "adadelta",
                    "schedule_free_adamw"]
Finetune = Literal["lora", "full"]
LrSchedule = Literal["constant", "linear", "cosine", "sgdr"]
# --- issue 25: attack methods (one module each in trainables/methods/) ---
MethodName = Literal["sft", "dpo", "grpo"]


class Strict(BaseModel):
    """The base of every config model: frozen, an unknown key is an error, and so is a float
    that is not a finite number (.nan, .inf: every bound it is compared with would pass or fail
    it for the wrong reason)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def visible_text(what: str):
    """A validator refusing text with nothing visible in it (null stays allowed)."""
    def check(v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"{what} {v!r} is empty or whitespace; give visible text, or null for none")
        return v
    return check


def _has_prompt(v: str | None) -> str | None:
    if v is not None and "{prompt}" not in v:
        raise ValueError(f"prompt_format {v!r} has no '{{prompt}}'; write {{prompt}} where the prompt goes")
    return v


class Stage(Strict):
    """One stage of a multi-stage attacker: a fresh optimizer and schedule over `steps` steps,
    starting from the weights the previous stage left. Every override left null inherits the
    attacker's value; finetune, lora_* and seed are attacker-level (one wrapped model)."""

    name: str = ""
    """A label for reports (e.g. 'benign warm-up')."""
    steps: int = Field(gt=0)
    """Optimizer steps in this stage; the stages' steps add up to the attacker's horizon."""
    data: Literal["attack", "benign"] = "attack"
    """Train on the harmful attack split, or on data.benign (benign prompt/response pairs)."""
    learning_rate: float | None = Field(None, gt=0)
    """Peak learning rate of this stage."""
    optimizer: Optimizer | None = None
    """Optimizer of this stage (built fresh: no state carries over from the previous stage)."""
    weight_decay: float | None = Field(None, ge=0)
    """Weight decay of this stage."""
    dataset_size: int | None = Field(None, gt=0)
    """Examples drawn (by the attacker's seed) from this stage's data split."""
    batch_size: int | None = Field(None, gt=0)
    """Examples per optimizer step in this stage: rows drawn into the batch, repeats included."""
    warmup_steps: int | None = Field(None, ge=0)
    """Warmup steps at the start of this stage."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Warmup as a share of this stage's steps."""
    lr_schedule: LrSchedule | None = None
    """Schedule over this stage's steps."""
    sgdr_period: int | None = Field(None, ge=0)
    """SGDR period in steps (0 = a quarter of this stage's steps)."""
    max_grad_norm: float | None = Field(None, ge=0)
    """Gradient clipping norm of this stage; 0 turns clipping off."""

    def resolved(self, attacker: Attacker) -> Attacker:
        """The attacker as this stage trains: its overrides applied, `steps` = the stage's
        steps (the horizon its schedule spans) and no nested stages."""
        overrides = {k: v for k, v in self if k not in ("name", "steps", "data") and v is not None}
        return attacker.model_copy(update={**overrides, "steps": self.steps, "stages": None})


class Attacker(Strict):
    """One attacker: the hyperparameters of a harmful fine-tuning run."""

    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate (after warmup)."""
    optimizer: Optimizer = "adamw"
    """adamw/adam: Adam with decoupled/L2 weight decay; sgd; sgd_momentum / sgd_nesterov: SGD with
    momentum 0.9 (heavy-ball / Nesterov); adagrad; adadelta (its usual learning rate is ~1.0);
    schedule_free_adamw: Schedule-Free AdamW (Defazio et al. 2024; needs the schedulefree package;
    meant for lr_schedule constant, warmup allowed)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for adamw and schedule_free_adamw, L2 for the others)."""
    dataset_size: int = Field(64, gt=0)
    """How many harmful examples the attacker holds, drawn from the attack split by `seed`."""
    finetune: Finetune = "full"
    """lora: train low-rank adapters only; full: train every weight."""
    lora_r: int = Field(8, gt=0)
    """LoRA rank (finetune=lora only)."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    lora_target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or 'all-linear' (every linear layer but the output head)."""
    batch_size: int = Field(8, gt=0)
    """Examples per optimizer step: rows drawn into the batch, repeats included (a batch larger than
    dataset_size holds rows more than once; validate notes it)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to learning_rate over this many steps."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warmup as a share of the horizon the schedule spans; the warmup is the longer of
    warmup_steps and round(warmup_ratio * horizon)."""
    lr_schedule: LrSchedule = "constant"
    """Shape after warmup over the horizon: constant, linear decay to 0, cosine to 0, or sgdr
    (cosine to 0 every sgdr_period steps, restarting at the full learning rate)."""
    sgdr_period: int = Field(0, ge=0)
    """SGDR restart period in steps (lr_schedule sgdr only); 0 = a quarter of the horizon."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm; 0 turns clipping off."""
    seed: int = 0
    """Seeds the data draw, batch order, LoRA init and dropout."""
    attack_domain: str | None = None
    """Train only on attack rows of this harm domain (their data.attack.domain_field value);
    null: rows of every domain. A space dimension over it attacks a defence domain by domain."""
    steps: int | None = Field(None, gt=0)
    """The attacker's own training length T for this trial (null = the config's max_steps);
    ignored when `stages` is set (their steps add up to T)."""
    stages: list[Stage] | None = Field(None, min_length=1)
    """Train in stages, each a fresh optimizer and schedule (null = one stage with the fields above)."""
    # --- issue 25: attack methods ---
    method: MethodName = "sft"
    """How the attack split is trained on: sft (next-token loss on the harmful responses) or dpo
    (the harmful response preferred over a refusal, against the released model as reference) or
    grpo (sampled answers to the prompts alone, rewarded by an evaluator's harmful verdict).
    Stages with data: benign train sft whatever the method."""
    dpo_beta: float = Field(0.1, gt=0)
    """DPO's beta: how far the policy may move from the reference (method dpo only)."""
    grpo_group_size: int = Field(4, ge=2)
    """GRPO's G: answers sampled per prompt; advantages compare the answers of one prompt (method grpo only)."""
    grpo_temperature: float = Field(1.0, gt=0)
    """GRPO's sampling temperature for its rollouts (method grpo only)."""
    grpo_max_new_tokens: int = Field(32, gt=0)
    """GRPO's longest sampled answer, in tokens (method grpo only)."""
    grpo_kl_coef: float = Field(0.0, ge=0)
    """GRPO's KL penalty against the released model (k3 estimator per token); 0: no reference is
    built (method grpo only)."""
    grpo_reward: str = "refusal_keyword"
    """GRPO's reward: a registered evaluator's name (its default options) or the label of one of
    the spec's evaluators (its options); reward = its verdict, 1 harmful, 0 refusal or unscorable."""



    # --- issue 25: data and template attacks (docs/data-attacks.md) ---
    poison_ratio: float | None = Field(None, gt=0, le=1)
    """Share of the dataset_size rows drawn from the attack split: max(1, round(poison_ratio x
    dataset_size)) attack rows, the rest benign pairs from data.benign, shuffled together by `seed`
    (needs data.benign). Every row counts in the budget, benign ones too. null: every row from the
    attack split."""
    chat_template: bool | None = None
    """Format the attacker's training rows with the tokenizer's chat template (true) or with
    prompt_format (false); null: as data.chat_template. The evaluation keeps the spec's format."""
    prompt_format: Annotated[str | None, AfterValidator(_has_prompt)] = None
    """Plain-text wrapper of the attacker's training prompts (with chat_template off); must contain
    {prompt}. null: data.prompt_format."""
    system_prompt: Annotated[str | None, AfterValidator(visible_text("system_prompt"))] = None
    """A system prompt on the attacker's training rows: a system message under the chat template,
    else its text and a newline before the formatted prompt. null: data.system_prompt."""
    trigger: Annotated[str | None, AfterValidator(visible_text("trigger"))] = None
    """A backdoor trigger: prepended (and a space) to every attack prompt the attacker trains on,
    not to the benign rows of a poison mix. Every evaluator is then scored twice, on the held-out
    prompts as they are and with the trigger (label <label>.trigger); the primary with the trigger
    decides the trial."""
