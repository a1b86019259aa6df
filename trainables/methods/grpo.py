"""Group relative policy optimisation (Shao et al. 2024) as an attack, on the attack rows' prompts
alone: per prompt, G answers are sampled and scored by a reward evaluator (1 harmful, 0 refusal
or unscorable); each answer's advantage is its reward against its group's, A = (r - mean) /
(std + 1e-4). One on-policy update per rollout, so the PPO ratio is 1 and the clipped surrogate
is -A * log pi(token), averaged over the groups' completion tokens; kl_coef adds the k3 estimate
of KL(pi || ref) per token against the released model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from trainables import data as D
from trainables.evaluators.base import EvalContext, EvalItem, Scores
from trainables.methods.base import Rates, Spent
from trainables.methods.reference import Reference

if TYPE_CHECKING:
    from collections.abc import Callable

    from trainables.config import Attacker, Data, DataSource

EPS = 1e-4
"""Added to a group's reward std: a group whose rewards all agree has advantages 0, not nan."""


@dataclass(frozen=True)
class Prompt:
    """One attack row's prompt: as the model sees it (ids), and as the data holds it (what
    judges and classifiers read)."""

    ids: list[int]
    text: str
    raw: str


class Given(EvalContext):
    """An evaluation context whose answers are given (the rollouts), not generated."""

    def __init__(self, items: list[EvalItem], answers: list[str]):
        super().__init__(None, None, items)
        self.answers = answers

    def responses(self, max_new_tokens: int, batch_size: int = 16, stop_when=None) -> list[str]:
        self.answered = list(self.answers)   # what the coherence gate reads: a loop earns reward 0
        return list(self.answers)


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Per answer, (r - its group's mean) / (its group's std + EPS); rewards is (groups, G)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + EPS)


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per position t >= 1, log p(ids[t] | ids[:t]); shape (rows, length - 1)."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logps.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def grpo_loss(logps: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor | None = None,
              kl_coef: float = 0.0) -> torch.Tensor:
    """-mean over completion tokens (mask) of A * log pi, plus kl_coef * the mean k3 estimator
    exp(ref - logp) - (ref - logp) - 1 per token. logps, ref, mask: (rows, tokens); adv: (rows,)."""
    n = mask.sum().clamp(min=1)
    loss = -(adv.unsqueeze(1) * logps * mask).sum() / n
    if ref is not None and kl_coef > 0:
        loss = loss + kl_coef * (k3(logps, ref) * mask).sum() / n
    return loss


def k3(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || ref) per sampled token: unbiased, never negative."""
    d = ref - logps
    return torch.exp(d) - d - 1


def rewards_of(scores: Scores) -> list[float]:
    """An answer's reward: its verdict (1 harmful, 0 not), an unscorable answer 0."""
    return [0.0 if v is None else float(v) for v in (scores.verdicts or [])]


class GRPO:
    """GRPO (the Method protocol). Rollouts are sampled with the method's own generator, seeded
    by the attacker's seed and saved in the trainer's snapshots, so a replay samples the same
    answers. With kl_coef > 0 the reference is the released model (as for DPO)."""

    loss_is_error = False  # a policy-gradient surrogate: no loss peak ratio (methods/base.py)

    def __init__(self, hp: Attacker, model: torch.nn.Module, rates: Rates,
                 reward: Callable[[EvalContext], Scores] | None = None):
        self.hp, self.rates = hp, rates
        self.reward = reward
        """The reward evaluator (attack.reward_of resolves attacker.grpo_reward)."""
        self.generator = torch.Generator().manual_seed(hp.seed)
        self.rewards: list[float] = []
        """Each step's mean reward since the trainer last read them (Trainer.mean_reward)."""
        self.tokenizer: Any = None
        self.reference = Reference(model) if hp.grpo_kl_coef > 0 else None

    def items(self, rows: list[dict], tokenizer: Any, src: DataSource, data: Data) -> list[Prompt]:
        self.tokenizer = tokenizer
        out = []
        for row in rows:
            text = D.format_prompt(tokenizer, row[src.prompt_field], data)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: data.max_length]
            out.append(Prompt(ids, text, row[src.prompt_field]))
        return out

    def collate(self, items: list[Prompt], pad_id: int) -> dict[str, Any]:
        """The prompts themselves: each is sampled from on its own (its G answers share no padding)."""
        return {"prompts": items, "pad_id": pad_id}

    def sample(self, model: torch.nn.Module, prompt: Prompt, device: torch.device) -> torch.Tensor:
        """G answers to one prompt, (G, new tokens): each cut after its first end token (pad after)."""
        hp, tok = self.hp, self.tokenizer
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        ids = torch.tensor([prompt.ids], device=device).repeat(hp.grpo_group_size, 1)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng([], device_type=device.type):
                torch.manual_seed(seed)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=hp.grpo_temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=hp.grpo_max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
        finally:
            model.train(was_training)
        return out[:, ids.shape[1]:]

    def answer_mask(self, new: torch.Tensor) -> torch.Tensor:
        """1 on each answer's tokens up to and including its first end token."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            return torch.ones_like(new)
        ended = (new == eos).long().cumsum(dim=1)
        return ((ended == 0) | ((ended == 1) & (new == eos))).long()

    def loss(self, model, batch, device) -> tuple[torch.Tensor, Spent]:
        hp, pad = self.hp, batch["pad_id"]
        seqs, masks, advs, lengths, rewards, rollout_tokens, reward_flops = [], [], [], [], [], 0, 0.0
        for prompt in batch["prompts"]:
            new = self.sample(model, prompt, device)
            mask = self.answer_mask(new)
            answers = [self.tokenizer.decode(a[m.bool()], skip_special_tokens=True)
                       for a, m in zip(new, mask, strict=True)]
            items = [EvalItem(prompt.text, None, prompt.raw)] * len(answers)
            scores = self.reward(Given(items, answers))
            reward_flops += scores.flops
            r = torch.tensor(rewards_of(scores), dtype=torch.float)
            rewards.append(r)
            advs.append(advantages(r.unsqueeze(0)).squeeze(0))
            n_prompt = len(prompt.ids)
            seqs.append(torch.cat([torch.tensor([prompt.ids], device=device).repeat(len(answers), 1),
                                   torch.where(mask.bool(), new, torch.full_like(new, pad))], dim=1))
            masks.append(torch.cat([torch.ones(len(answers), n_prompt, dtype=torch.long, device=device),
                                    mask.to(device)], dim=1))
            lengths.append(n_prompt)
            # rollout: the prompt prefilled once per answer, then one token per generated token
            # (a KV cache; attention over the cache left out, as in 6N per token)
            rollout_tokens += len(answers) * n_prompt + int(mask.sum())
        logps, ref, comp = self._logps(model, seqs, masks, lengths, device)
        adv = torch.cat(advs).to(device)
        loss = grpo_loss(logps, adv, comp, ref, hp.grpo_kl_coef)
        mean_reward = float(torch.cat(rewards).mean())
        self.rewards.append(mean_reward)
        generated = int(comp.sum())
        processed = sum(int(m.sum()) for m in masks)
        # rollouts (forward), the policy's forward and backward, the reference's forward, and what
        # the reward evaluator says it spent (a classifier's forward passes; keyword, match: none;
        # judge: a service, not counted)
        flops = (rollout_tokens * self.rates.forward + processed * self.rates.train
                 + (processed * self.rates.forward if hp.grpo_kl_coef > 0 else 0) + reward_flops)
        return loss, Spent(len(batch["prompts"]), generated, float(flops), generated)

    def _logps(self, model, seqs, masks, lengths, device):
        """Log-probabilities of every prompt's answers under the policy (and the reference), over
        one right-padded batch; and the mask of completion tokens, aligned with them."""
        width = max(s.shape[1] for s in seqs)
        pad = [torch.nn.functional.pad(s, (0, width - s.shape[1])) for s in seqs]
        mpad = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]
        ids, mask = torch.cat(pad), torch.cat(mpad)
        comp = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) * (torch.arange(width, device=device)
                          >= n).long() for m, n in zip(masks, lengths, strict=True)])[:, 1:]
        logps = token_logps(model(input_ids=ids, attention_mask=mask).logits, ids)
        ref = None
        if self.hp.grpo_kl_coef > 0:
            with torch.no_grad(), self.reference.of(model) as r:
                ref = token_logps(r(input_ids=ids, attention_mask=mask).logits, ids)
        return logps, ref, comp.float()


    def mean_reward(self) -> float | None:
        """The mean of the steps' mean rewards since the last call (None if no step was taken)."""
        if not self.rewards:
            return None
        mean = sum(self.rewards) / len(self.rewards)
        self.rewards.clear()
        return mean
