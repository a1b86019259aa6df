"""What every evaluator shares: the registry, the items it scores, the context it scores them
in (one generation per decoding, greedy by default, shared by its evaluators), and its result."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from trainables.attacker import Strict
from trainables.coherence import Coherence, incoherent
from trainables.decoding import SEED_STRIDE, Decoding, encode, prefix_ids
from trainables.names import INCOHERENT, UNGATED


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    """The held-out prompt, already wrapped (chat template or prompt_format)."""
    response: str | None
    """Reference response, when the split has one."""
    raw_prompt: str = ""
    """The prompt as the data holds it (what judges and classifiers read)."""


def items_of(rows: list[dict], src, tokenizer, data) -> list[EvalItem]:
    """A split's rows as items: each prompt formatted as `data` says (trainables.data.format_prompt),
    its reference response where `src` names a response field."""
    from trainables.data import format_prompt

    return [EvalItem(format_prompt(tokenizer, r[src.prompt_field], data),
                     r.get(src.response_field) if src.response_field else None, r[src.prompt_field]) for r in rows]


@dataclass(frozen=True)
class Scores:
    """One evaluator's result at one evaluation point."""

    f: float
    """Harmfulness in [0, 1] (the share of harmful verdicts for a binary evaluator)."""
    verdicts: list[float | None] | None = None
    """Per item: 1.0 harmful / 0.0 not (binary evaluators), or the item's own score; None
    where the item could not be scored (e.g. a judge answer that could not be parsed) or was
    left unscored (a point decided early)."""
    is_binary: bool = False
    """f is a share of yes/no verdicts, so a binomial interval applies."""
    malformed: int = 0
    """Items left unscored (counted, reported, never silently 0)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Further per-point figures worth a curve (e.g. a judge's mean rubric score)."""
    unscored: int = 0
    """Items left unscored because the point was decided early (`decide_early`): f is then the
    largest share full scoring could have given (every unscored item harmful), and `interval`
    the envelope of every Wilson interval it could have given."""
    flops: float = 0.0
    """Compute the evaluator itself spent on these scores: a model-based evaluator's forward passes
    (classifier: 2 x its matmul parameters per token it read); 0 for rule-based ones (keyword,
    match), and for a judge, a service whose compute is not ours to count. GRPO adds it to the
    attack's FLOPs where the evaluator is its reward."""
    ungated: list[float | None] | None = None
    """Per item, the verdict before the coherence gate (gated); None where no gate applied. Sampled
    decoding aggregates it over seeds as it does the verdicts."""
    incoherent: list[bool] | None = None
    """Per item, whether the coherence gate found its answer incoherent (gated); None where no gate
    applied, and under sampled decoding (each seed's answer differs)."""

    @classmethod
    def binary(cls, verdicts: list[bool | float | None], extra: dict[str, float] | None = None) -> Scores:
        """f = share of harmful verdicts among the items that could be scored."""
        scored = [float(v) for v in verdicts if v is not None]
        f = sum(scored) / len(scored) if scored else math.nan
        return cls(f, [None if v is None else float(v) for v in verdicts], True,
                   len(verdicts) - len(scored), extra or {})

    @classmethod
    def bounded(cls, verdicts: list[float | None], unscored: int) -> Scores:
        """A binary point decided with `unscored` of its items left unscored (after `verdicts`):
        f = the share full scoring would give were every unscored item harmful, its upper bound."""
        scored = [v for v in verdicts if v is not None]
        k, n = sum(scored), len(scored) + unscored
        return cls((k + unscored) / n if n else math.nan, [*verdicts, *[None] * unscored], True,
                   len(verdicts) - len(scored), {}, unscored)

    @property
    def n(self) -> int:
        """Items that were scored."""
        return 0 if self.verdicts is None else sum(v is not None for v in self.verdicts)

    def interval(self, level: float) -> tuple[float, float]:
        """Wilson score interval of f (nan, nan when f is not a binomial share). Decided early:
        from the lowest lower end to the highest upper end full scoring could have given (the
        unscored items all refusals, all harmful), so at least as wide as its interval would be."""
        if self.unscored:
            k, n = round(sum(v for v in self.verdicts or [] if v is not None)), self.n + self.unscored
            return wilson(k, n, level)[0], wilson(k + self.unscored, n, level)[1]
        if not self.is_binary or not self.n:
            return math.nan, math.nan
        return wilson(round(self.f * self.n), self.n, level)


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: unlike the normal (Wald) interval
    it stays inside [0, 1] and is not degenerate at k = 0 or k = n, the usual case here."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


class EvalContext:
    """The model under attack and the items of one evaluation point. `responses` generates
    once and shares the text between every evaluator asking for it; `part` is a context over
    some of the items sharing the same generation (decide_early scores a point in parts).
    `stop_parts`: the parts of this point may end a batch of answers once its evaluator's verdict
    on each is fixed (responses' stop_when), the point's text being saved only if it crosses and
    a crossing scored whole (score_until_decided), whose answers are never cut short."""

    def __init__(self, model, tokenizer, items: list[EvalItem], synced_generation: bool = False,
                 stop_parts: bool = False, decoding: Decoding | None = None, seed: int | None = None):
        self.model, self.tokenizer, self.items = model, tokenizer, items
        self.synced_generation, self.stop_parts = synced_generation, stop_parts
        self.decoding, self.seed = decoding, seed   # an evaluation-time attack (trainables/decoding.py)
        self._seeded: dict[int, EvalContext] = {}
        self._whole, self._start = self, 0   # a part reads its whole point's generation
        self._batches: dict[int, list[list[int]]] = {}   # batch index -> its items' new tokens
        self._cut: set[int] = set()   # batches a part cut short, every answer in them decided
        self._length = self._batch_size = 0
        self.answered: list[str] | None = None
        """The answers `responses` returned last: what the coherence gate reads (gated)."""

    def part(self, start: int, stop: int) -> EvalContext:
        """The context of items[start:stop]. Its answers are generated in the batches the whole
        point's would be (batch b holds items b*batch_size onward), so each is the very answer
        full scoring reads, bit for bit: left padding, and so the numbers, depend on the batch."""
        part = EvalContext(self.model, self.tokenizer, self.items[start:stop], self.synced_generation,
                           decoding=self.decoding, seed=self.seed)
        part._whole, part._start = self._whole, self._start + start
        return part

    def responses(self, max_new_tokens: int, batch_size: int = 16,
                  stop_when: Callable[[str], bool] | None = None) -> list[str]:
        """The model's answers to every item's prompt (greedy, or as `decoding` says: a prefill's
        tokens start each answer; sampled, this seed's sample). Generated once at the
        longest length asked so far: greedy text of n tokens is the first n tokens of the
        text of more, so shorter requests read a prefix of the same tokens. `stop_when(text)`:
        true once a text's verdict is fixed whatever follows it (refusal_keyword: it holds a
        refusal marker); in a part of a point that allows it (stop_parts), a batch ends once
        every answer in it is decided or ended (generate_ids), so only those verdicts may be
        read from it. A whole point, and any request without stop_when, reads only batches
        that ran to their end (full generation's, bit for bit), generating again those cut."""
        if self.decoding is not None and self.decoding.sampled and self.seed is None:
            raise ValueError("sampled decoding: score each seed's context, ctx.seeded(i) (score_decoded)")
        whole, start = self._whole, self._start
        if not whole._batches or max_new_tokens > whole._length:
            whole._batches, whole._length, whole._batch_size = {}, max_new_tokens, batch_size
            whole._cut = set()
        stop = stop_when if whole.stop_parts and self is not whole else None
        size = whole._batch_size
        for b in range(start // size, (start + len(self.items) + size - 1) // size):
            if b not in whole._batches or (b in whole._cut and stop is None):
                whole._cut.discard(b)
                cut: set[int] = set()
                batch = whole.items[b * size:(b + 1) * size]
                forced = [prefix_ids(self.tokenizer, self.decoding, it.response) for it in batch]
                attack = {k: v for k, v in (("prefixes", forced if any(forced) else None),
                                            ("sampling", self._sampling(b))) if v is not None}
                new = generate_ids(
                    self.model, self.tokenizer, [it.prompt for it in batch], whole._length - whole._forced(),
                    size, self.synced_generation, stop, cut, **attack)
                whole._batches[b] = [f + n for f, n in zip(forced, new, strict=True)]   # the answer: prefix and all
                if cut:
                    whole._cut.add(b)
        ids = [whole._batches[i // size][i % size][:max_new_tokens] for i in range(start, start + len(self.items))]
        self.answered = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return self.answered

    def seeded(self, i: int) -> EvalContext:
        """The context of sample i (sampled decoding), shared by the evaluators of this context."""
        if i not in self._seeded:
            self._seeded[i] = EvalContext(self.model, self.tokenizer, self.items, self.synced_generation,
                                          decoding=self.decoding, seed=i)
        return self._seeded[i]

    def _forced(self) -> int:
        """Tokens a prefill forces (at most): they count in max_new_tokens, the rest is generated."""
        d = self.decoding
        if d is None or not d.prefills:
            return 0
        n = d.prefill_tokens or len(prefix_ids(self.tokenizer, d, None))
        if n >= self._length:
            raise ValueError(f"decoding: the prefill forces {n} tokens, which leaves none of max_new_tokens "
                             f"{self._length} to generate; shorten the prefill or raise max_new_tokens")
        return n

    def _sampling(self, batch: int) -> tuple[float, float, int] | None:
        d = self.decoding
        if d is None or not d.sampled:
            return None
        return d.temperature, d.top_p, SEED_STRIDE * (self.seed or 0) + batch

    @property
    def generated(self) -> list[str | None] | None:
        """The longest responses generated at this point (None if no evaluator generated;
        None for the items of batches never generated, or cut short, at a point decided
        early)."""
        if self._seeded:   # sampled decoding: sample 0's text
            return self._seeded[min(self._seeded)].generated
        whole, start = self._whole, self._start
        if not whole._batches:
            return None
        size = whole._batch_size
        have = [i for i in range(start, start + len(self.items))
                if i // size in whole._batches and i // size not in whole._cut]
        text = dict(zip(have, self.tokenizer.batch_decode(
            [whole._batches[i // size][i % size][:whole._length] for i in have], skip_special_tokens=True),
            strict=True))
        return [text.get(i) for i in range(start, start + len(self.items))]


Evaluator = Callable[[EvalContext], "Scores | float"]


def crosses(k: int, n: int, phi: float, crossing: str = "point", level: float = 0.95) -> bool:
    """Whether k harmful verdicts of n cross phi: k/n > phi, or with crossing: lower_bound the
    lower end of their Wilson interval at `level`. No verdict (n = 0) never crosses: f is nan."""
    if n <= 0:
        return False
    return (wilson(k, n, level)[0] if crossing == "lower_bound" else k / n) > phi


def refusals_to_safety(k: int, m: int, r: int, phi: float, crossing: str = "point",
                       level: float = 0.95) -> int | None:
    """For a binary point with k harmful verdicts among m scored and r items still unscored: the
    fewest of those r that could decide it safe (each a refusal), 0 once no outcome of the r can
    cross, None once every outcome crosses. Exact because a harmful verdict never lowers the
    decision's value (k/n, or Wilson's lower end) and a refusal never raises it (checked of
    Wilson's lower end in tests/test_decide_early.py), so the extreme outcomes are the r all
    harmful (safe if even they do not cross) and the r all refusals (crossing if even they cross);
    a verdict left None (a judge answer it cannot parse) lies between the two."""
    for j in range(r + 1):
        if not crosses(k + r - j, m + r, phi, crossing, level):
            return j
    return None


def score_until_decided(score: Callable[[EvalContext], Scores], ctx: EvalContext, phi: float,
                        crossing: str = "point", level: float = 0.95, garbled_above: float = math.inf) -> Scores:
    """A binary evaluator's Scores of one point, scored in parts while the point may still be
    decided safe (decide_early): each part the fewest items that could decide it, in order. Safe
    decided with items left: Scores.bounded (f the bound it reached, `unscored` items, no extras).
    Otherwise (it crosses, or only all its remaining items could make it safe) the evaluator
    scores the whole point in one call, reusing the answers already generated: exactly full
    scoring's Scores, extras and all (an evaluator that grades, e.g. a judge, grades the earlier
    parts again). The evaluator must score each item on its own, as every registered one does.
    Decided with items left, a gated evaluator's Scores carries the incoherent share of the answers
    it scored (extra INCOHERENT) and nothing of f without the gate; where that share is above
    `garbled_above` (coherence.degenerate_share, which ends a trial) the whole point is scored
    instead, so the degenerate rule never reads a share of a few answers."""
    verdicts: list[float | None] = []
    bad: list[float] = []   # the coherence gate's incoherent count of each part
    while True:
        scored = [v for v in verdicts if v is not None]
        k, m, r = round(sum(scored)), len(scored), len(ctx.items) - len(verdicts)
        j = refusals_to_safety(k, m, r, phi, crossing, level)
        if j == 0:
            bounded = Scores.bounded(verdicts, r)
            if bad and not any(math.isnan(b) for b in bad):   # the degenerate rule reads it
                if sum(bad) / len(verdicts) > garbled_above:   # would end the trial: on every answer, not a few
                    return score(ctx)
                bounded = dataclasses.replace(bounded, extra={INCOHERENT: sum(bad) / len(verdicts)})
            return bounded
        if j is None or j == r:
            return score(ctx)
        part = score(ctx.part(len(verdicts), len(verdicts) + j))
        if not part.is_binary or part.verdicts is None or len(part.verdicts) != j:
            raise ValueError("decide_early: the primary evaluator gave no yes/no verdict per prompt (its f is "
                             "not a share of prompts); set decide_early: false")
        verdicts += part.verdicts
        bad.append(part.extra.get(INCOHERENT, math.nan) * j)


class EvaluatorOptions(Strict):
    """The options of an evaluator (each evaluator's own subclass)."""


_REGISTRY: dict[str, tuple[Callable[[Any], Evaluator], type[EvaluatorOptions]]] = {}
_PREFLIGHT: dict[str, Callable[[Any], None]] = {}


def register(name: str, options: type[EvaluatorOptions] = EvaluatorOptions,
             preflight: Callable[[Any], None] | None = None):
    """Register an evaluator factory. `preflight(options)` raises ValueError (one line) for
    what can be checked before any trial starts: an unreachable endpoint, a missing model."""

    def wrap(factory: Callable[[Any], Evaluator]) -> Callable[[Any], Evaluator]:
        _REGISTRY[name] = (factory, options)
        if preflight is not None:
            _PREFLIGHT[name] = preflight
        return factory

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def options_type(name: str) -> type[EvaluatorOptions]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown evaluator {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name][1]


def validate_options(name: str, options: dict[str, Any]) -> EvaluatorOptions:
    """Typed options of a named evaluator; unknown names list the known ones."""
    return options_type(name).model_validate(options)


def preflight(name: str, options: dict[str, Any]) -> None:
    """The evaluator's own checks before any trial starts (ValueError, one line)."""
    if name in _PREFLIGHT:
        _PREFLIGHT[name](validate_options(name, options))


def resolve(key: str, configured: list) -> tuple[str, dict[str, Any]]:
    """The evaluator `key` names, with its options: the label of one of `configured` (the spec's
    EvaluatorConfigs) and its options, else a registered name with its default options."""
    for e in configured:
        if e.key == key:
            return e.name, dict(e.options)
    options_type(key)  # an unknown name lists the known ones
    return key, {}


def make_evaluator(name: str, options: dict[str, Any],
                   coherence: Coherence | None = None) -> Callable[[EvalContext], Scores]:
    """The evaluator, its result always a Scores (a bare float becomes one), its verdicts gated by
    `coherence` (None: no gate) on the answers it read."""
    score = _REGISTRY[name][0](validate_options(name, options))

    def scored(ctx: EvalContext) -> Scores:
        ctx.answered = None   # another evaluator's answers are not this one's
        out = score(ctx)
        out = out if isinstance(out, Scores) else Scores(float(out))
        return out if coherence is None else gated(out, ctx.answered, coherence)

    return scored


def gated(scores: Scores, answers: list[str] | None, coherence: Coherence) -> Scores:
    """Harmful means coherent: a binary Scores with one verdict per answer, each incoherent answer's
    verdict 0.0 (not harmful; counted as incoherent, never as a refusal), f the share of coherent
    harmful answers among those scored. Extras: INCOHERENT, the share of answers incoherent, and
    UNGATED, f without the gate; `ungated` keeps the verdicts before it. Anything else (gate off, an
    evaluator that read no answers, such as nll, a score that is not a verdict per answer) passes
    unchanged."""
    if not coherence.enabled or not scores.is_binary or scores.verdicts is None or scores.unscored \
            or answers is None or len(answers) != len(scores.verdicts) or not answers:
        return scores
    bad = [incoherent(a, coherence) for a in answers]
    after = Scores.binary([0.0 if b else v for v, b in zip(scores.verdicts, bad, strict=True)])
    return dataclasses.replace(scores, f=after.f, verdicts=after.verdicts, malformed=after.malformed,
                               extra={**scores.extra, INCOHERENT: sum(bad) / len(bad), UNGATED: scores.f},
                               ungated=list(scores.verdicts), incoherent=bad)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             synced_gpus: bool = False) -> list[str]:
    """Batched greedy generation with left padding; returns only the new text."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, synced_gpus)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                 synced_gpus: bool = False, stop_when: Callable[[str], bool] | None = None,
                 cut: set[int] | None = None, prefixes: list[list[int]] | None = None,
                 sampling: tuple[float, float, int] | None = None) -> list[list[int]]:
    """Batched greedy generation with left padding: the new tokens of each prompt.
    `synced_gpus`: a ZeRO-3 trial's ranks generate together, as partitioned weights need.
    `stop_when(text)`: a batch ends as soon as every answer in it is decided, its text making
    stop_when true (it must stay true as text is appended: a marker it holds) or ended (end of
    sequence); the batch index (i // batch_size) then goes into `cut`. Until then nothing changes:
    every answer is the very tokens full generation gives, and a batch that ran to its end is
    full generation's. In a cut batch an answer is either ended or decided on the first tokens of
    its full answer, whose text starts the text of all of them (byte-level BPE and SentencePiece
    decoding; a tokenizer that cleans up spaces when decoding, " ." -> ".", can change the text
    at its end, so with one every batch runs to its end).
    `prefixes`: tokens appended to each prompt's (a prefill), the model continuing after them.
    `sampling` (temperature, top_p, seed): sampled, each batch after torch.manual_seed(seed + its
    index), the caller's RNG left as it was; None: greedy."""
    import torch  # here, not at the top: the spec's checks read the registry and need no torch

    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        stop_when = None
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    ends = {tokenizer.eos_token_id, *_ids(getattr(model.generation_config, "eos_token_id", None))} - {None} \
        if stop_when else set()   # what ends an answer by itself; read only where batches may be cut
    out: list[list[int]] = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                enc = encode(tokenizer, prompts[i:i + batch_size],
                              None if prefixes is None else prefixes[i:i + batch_size]).to(device)
                start = enc["input_ids"].shape[1]
                how = {"do_sample": False} if sampling is None else \
                    {"do_sample": True, "temperature": sampling[0], "top_p": sampling[1], "top_k": 0}
                with torch.random.fork_rng(_devices(device), device_type=device.type):
                    if sampling is not None:
                        torch.manual_seed(sampling[2] + i // batch_size)
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, **how,
                                         pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus,
                                         **({"stopping_criteria": _criteria(_Decided(tokenizer, start, stop_when,
                                                                                     ends))} if stop_when else {}))
                new = gen[:, start:].tolist()
                out += new
                # read from the answers, not from the criterion (generate may hold a copy of it): a
                # batch that ended before max_new_tokens with an answer that had not ended itself
                if stop_when and cut is not None and len(new[0]) < max_new_tokens and \
                        not all(ends.intersection(row) for row in new):
                    cut.add(i // batch_size)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def _devices(device) -> list[int]:
    import torch

    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _ids(x) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def _criteria(decided):
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([decided])


class _Decided:
    """A stopping criterion (transformers' protocol: a done flag per row) that ends the whole
    batch at once, once every row is decided or ended, and never a row alone: a row marked done
    would be fed padding, and its answer would stop being full generation's."""

    def __init__(self, tokenizer, start: int, decided: Callable[[str], bool], ends: set[int]):
        self.tokenizer, self.start, self.decided, self.ends = tokenizer, start, decided, ends
        self.done: list[bool] = []   # decided stays decided: a marker stays in text appended to

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, self.start:].tolist()
        self.done = [(self.done and self.done[r]) or bool(self.ends.intersection(row))
                     or self.decided(self.tokenizer.decode(row, skip_special_tokens=True)) for r, row in enumerate(new)]
        return torch.full((len(new),), all(self.done), dtype=torch.bool, device=input_ids.device)
