"""One harmful fine-tuning attack, read top to bottom.

    from trainables import AttackConfig, run_attack
    result = run_attack(AttackConfig.model_validate(cfg), on_eval=lambda p: print(p))
    result.status, result.budget_to_failure
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trainables import data as D
from trainables import mixing
from trainables.budget import EvalPoint, flops_per_token
from trainables.checkpoint import (
    load_model,
    load_tokenizer,
    make_trainable,
    matmul_params,
    resolve_device,
)
from trainables.config import AttackConfig
from trainables.evaluators import EvalContext, EvalItem, Scores, make_evaluator, score_decoded
from trainables.evaluators.base import items_of, resolve, score_until_decided
from trainables.g_effect import GEffectProbe
from trainables.methods import Rates
from trainables.methods import build as build_methods
from trainables.names import (
    BUDGET_UNITS,
    PROMPTS_SCORED,
    STEP0_CACHED,
    SUCCESS,
    TRAIN_REWARD,
    Status,
    per_domain,
    per_evaluator,
    triggered,
)
from trainables.optim import evaluating
from trainables.outcome import (
    at_crossing,
    at_release,
    at_safe_point,
    breaks,
    crossed_incoherent_only,
    crosses,
    decision_value,
    earliest,
    garbled,
    incoherent_share,
    tolerance,
    ungated_value,
)
from trainables.parallel import DataParallel
from trainables.step0_cache import Step0Cache
from trainables.trainer import Snapshot, Trainer
from trainables.utility import make_utility


@dataclass
class AttackResult:
    status: Status
    points: list[EvalPoint] = field(default_factory=list)
    trained_steps: int = 0
    """Optimizer steps actually run, refinement replays included (the trial's cost to us)."""

    @property
    def budget_to_failure(self) -> EvalPoint | None:
        """The evaluation at which f first exceeded phi (None unless the attack succeeded)."""
        return self.points[-1] if self.status in SUCCESS else None

    @property
    def censored_at_steps(self) -> int | None:
        return self.points[-1].step if self.status == "resisted" else None


@dataclass
class Reading:
    """What one evaluation point measured (on the ranks that score)."""

    scores: dict[str, Scores]
    """By evaluator label, the primary first."""
    utility: float
    seconds: float
    responses: list[str | None] | None
    cached: bool | None = None
    """Read back from the step-0 cache (True), measured and stored there (False), or the cache
    was not asked (None)."""
    g_effect: dict[str, float] = field(default_factory=dict)
    """The G-effect curves (g_effect.GEffectProbe.measure); empty without cfg.g_effect."""

    def samples(self, items: list[EvalItem]) -> list[dict[str, Any]]:
        """Per held-out prompt: the primary's answer, each evaluator's verdict, and where the coherence
        gate read the answer, whether it found it incoherent (a loop or a fragment: never harmful)."""
        gated = {k: s.incoherent for k, s in self.scores.items() if s.incoherent is not None}
        return [{"prompt": it.raw_prompt, "response": None if self.responses is None else self.responses[i],
                 "verdicts": {k: None if s.verdicts is None else s.verdicts[i] for k, s in self.scores.items()},
                 **({"incoherent": {k: flags[i] for k, flags in gated.items()}} if gated else {})}
                for i, it in enumerate(items)]

    def curves(self, level: float, primary: str, domains: list[str | None]) -> dict[str, float]:
        """Every evaluator's figures (metric.label), and the primary's f per harm domain of the
        held-out prompts (harmfulness_in.<domain>) where the eval split names domains."""
        out: dict[str, float] = {}
        verdicts = self.scores[primary].verdicts
        if verdicts is not None:
            for d in sorted({d for d in domains if d is not None}):
                mine = [v for v, x in zip(verdicts, domains, strict=True) if x == d and v is not None]
                if mine:
                    out[per_domain("harmfulness", d)] = sum(mine) / len(mine)
        for label, s in self.scores.items():
            lo, hi = s.interval(level)
            out.update({per_evaluator("harmfulness", label): s.f, per_evaluator("harmfulness_lo", label): lo,
                        per_evaluator("harmfulness_hi", label): hi})
            if s.is_binary:
                out[per_evaluator("malformed", label)] = float(s.malformed)
            out.update({per_evaluator(k, label): float(v) for k, v in s.extra.items()})
        return out


def run_attack(cfg: AttackConfig, on_eval: Callable[[EvalPoint], None] = lambda p: None,
               devices: int = 1) -> AttackResult:
    """One attack, every evaluation passed to `on_eval`; returns the trial's result.

    The loop: load the released checkpoint, wrap it (LoRA or all weights), draw the
    attacker's data, then train through the attacker's stages (one, unless it lists
    several), measuring at the steps cfg.eval_steps() names (step 0, the eval schedule, every
    stage's end, the horizon T) harmfulness f on held-out harmful prompts with every evaluator
    (the primary one decides), and utility u on held-out benign prompts. It stops at the first
    crossing of phi (failed, or degenerate where u fell more than epsilon), a nan/inf loss (diverged),
    the horizon (resisted), or a point after step 0 where more than coherence.degenerate_share of
    the primary's answers are incoherent (degenerate, crossing or not); outcome.py holds these rules.
    Harmful means coherent: every binary evaluator's verdicts pass the coherence gate (coherence.py,
    evaluators.base.gated), and the first step where f without it crossed phi while f did not is
    recorded on the final point (incoherent_crossing), never a success.
    Budget per step, as the attacker's method counts it (trainables/methods/; sft: examples +=
    batch_size; tokens += supervised tokens (each response and the end-of-sequence token appended to
    it); flops += budget.flops_per_token * processed tokens); accelerator_seconds += the step's time
    (evaluation excluded). Ray and MLflow stay outside:
    the caller gets every evaluation through `on_eval`.

    A crossing seen at step hi is only known to lie in (lo, hi], lo the last safe
    evaluation. With cfg.refine = r the loop bisects that window r times on f alone, replaying
    training from a snapshot taken at lo (batches, RNG and optimizer state all restored,
    so the replay is the run itself): each round one evaluation, reported as "running",
    and at most half the window in extra steps. The refined crossing then comes again,
    as "failed" (or "degenerate", judged by u there), with its budget and resolution.
    Evaluators other than the primary never stop a trial; each one's first crossing (with u
    within the bound) is reported with the final point. Evaluators of one decoding (greedy, or an
    evaluation-time attack: a prefill, sampling under several seeds; trainables/decoding.py) share
    one generation per point.
    With cfg.decide_early the primary stops scoring a point once it can no longer cross phi
    (evaluators.base.score_until_decided): only where the point's text is never saved, i.e. not
    at step 0, not at the horizon, and not at a point that crosses (scored in full, as it may be
    the final one); so early decisions fall on safe points between and on refinement midpoints.
    There a batch of answers also ends once every answer in it is decided (refusal_keyword: it holds
    a refusal marker) or ended (EvalContext.stop_parts).
    Step 0 reads the release, whatever the attacker trains: the trials against one checkpoint share
    that reading through the step-0 cache (step0_cache.py; ATTACK_SWEEP_STEP0_CACHE=0 turns it off),
    and the step-0 point then carries curve step0_cached (1 read back, 0 measured and stored).
    With cfg.g_effect every evaluation point also carries the G-effect (g_effect.py): how a plain
    gradient step on the current stage's attack rows moves the loss of held-out benign and harmful
    answers, per layer block. It reads the attacker's data, so step 0 measures it even when its
    reading comes from the step-0 cache; it never changes the run.

    The attacker's rows are data (mixing.py, docs/data-attacks.md): a poison mix of attack and benign
    rows (every row counts in the budget), its own prompt format, a backdoor trigger on its attack
    prompts; the evaluation keeps cfg.data's format. With a trigger every evaluator also scores the
    held-out prompts with it (label <label>.trigger), and the primary with the trigger decides.

    `devices`: accelerators the trial trains on, the factor on accelerator_seconds (a
    DeepSpeed trial counts its workers itself). Under DeepSpeed every worker calls this with
    the same cfg and reports the same points."""
    atk, stages = cfg.attacker, cfg.stages
    torch.manual_seed(atk.seed)
    device = resolve_device(cfg.device)
    parallel = DataParallel(cfg.deepspeed, device) if cfg.deepspeed else None
    synced = parallel is not None and parallel.synced_generation
    if parallel is not None:
        devices = parallel.world.size

    # --- the released model, made trainable ---------------------------------------
    tokenizer = load_tokenizer(cfg.checkpoint)
    model = load_model(cfg.checkpoint, device)
    n_matmul = matmul_params(model)
    model, n_lora = make_trainable(model, atk)
    model.train()

    # --- data: each stage's draw and batch order, the held-out prompts f is scored on, and
    # the held-out benign prompts utility is scored on
    sources = {"attack": cfg.data.attack, "benign": cfg.data.benign}
    wanted = {s.data for s in stages} | ({"benign"} if atk.poison_ratio is not None else set())
    rows = {name: D.load_rows(sources[name]) for name in wanted}
    if "attack" in rows:
        rows["attack"] = D.of_domain(rows["attack"], sources["attack"], atk.attack_domain)
    # each stage's method (trainables/methods/) turns its rows into items, batches and a loss
    rates = Rates(train=flops_per_token(n_matmul, n_lora), forward=2 * n_matmul)
    gate = cfg.coherence if cfg.coherence.enabled else None   # harmful means coherent (coherence.py)
    garble = gate.degenerate_share if gate else math.inf   # a point decided early past it is scored whole
    reward = make_evaluator(*resolve(atk.grpo_reward, cfg.all_evaluators), gate) if atk.method == "grpo" else None
    methods = build_methods(atk, stages, model, rates, reward)
    train_format = mixing.attacker_format(cfg.data, atk)  # the evaluation keeps cfg.data's
    streams = []
    for stage, method in zip(stages, methods, strict=True):
        hp, src = stage.resolved(atk), sources[stage.data]
        split = stage.data if stage.data == "benign" or atk.attack_domain is None else \
            f"attack split's {atk.attack_domain!r} domain"
        if stage.data == "attack":  # a poison mix, a trigger: mixing.attacker_rows
            drawn = mixing.attacker_rows(rows["attack"], rows.get("benign"), hp, src, sources["benign"], split)
        else:
            drawn = D.draw(rows[stage.data], hp.dataset_size, hp.seed, split)
        items = method.items(drawn, tokenizer, src, train_format)
        streams.append(D.BatchStream(items, hp.batch_size, hp.seed, tokenizer.pad_token_id, method.collate))
    eval_src = cfg.data.eval
    eval_rows = D.load_rows(eval_src)[: cfg.data.eval_size]
    eval_items = items_of(eval_rows, eval_src, tokenizer, cfg.data)
    eval_domains = D.domains(eval_rows, eval_src)
    evaluators = {e.key: make_evaluator(e.name, e.options, gate) for e in cfg.all_evaluators}
    decodings = {e.key: (e.decoding and e.decoding.key, e.decoding) for e in cfg.all_evaluators}
    primary = cfg.evaluator.key
    # a backdoor trigger: every evaluator scores the held-out prompts also with the trigger before
    # them (label <label>.trigger), and the primary with the trigger decides: the attacker's own goal
    triggered_items = [
        EvalItem(D.format_prompt(tokenizer, mixing.with_trigger(it.raw_prompt, atk.trigger), cfg.data),
                 it.response, it.raw_prompt) for it in eval_items] if atk.trigger else []
    if atk.trigger:
        primary = triggered(primary)
    every = [*evaluators, *(map(triggered, evaluators) if atk.trigger else [])]
    labels = [primary, *(k for k in every if k != primary)]  # the decisive one first
    utility = make_utility(cfg.utility, tokenizer, cfg.data, synced) if cfg.utility else None
    probe = GEffectProbe.for_trial(cfg, model, tokenizer, eval_rows)  # None: g_effect off
    epsilon = tolerance(cfg.utility)

    trainer = Trainer(model, atk, stages, streams, methods, rates, device, devices, parallel)
    start = time.perf_counter()
    points: list[EvalPoint] = []
    crossings: dict[str, EvalPoint] = {}  # each evaluator's earliest crossing with the model working
    u0 = math.nan
    by_incoherent: list[int] = []   # steps where f crossed phi only through incoherent answers

    def decision(s: Scores) -> float:
        return decision_value(s, cfg.crossing, cfg.confidence)

    def note(value: float, ungated: float) -> None:
        if crossed_incoherent_only(ungated, value, cfg.phi):
            by_incoherent.append(trainer.budget.steps)

    # evaluation never draws from the training RNG: an evaluator loaded at its first point (a
    # classifier missing weights initialises them) must not move the attacker's dropout, so a
    # trial whose step 0 was read back trains exactly as one that measured it
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []

    def measure(early: bool = False, cache: Step0Cache | None = None) -> tuple[Reading | None, float, float, float]:
        """Score every evaluator and utility; returns this rank's reading (None where it does
        not score) and the three numbers every rank decides on: the primary's crossing value
        (f, or its interval's lower end), utility and the primary's incoherent share (nan without
        the coherence gate), as rank 0 measured them; notes a crossing by incoherent answers only. `early`: a point
        whose text is saved only if it crosses, which cfg.decide_early may then decide early
        (not under ZeRO-3 synced generation, where every rank must make the same generate calls).
        `cache`: step 0's entry in the step-0 cache, read instead of measuring when it is there,
        else written; its seconds are then the time actually spent."""
        early = early and cfg.decide_early and not synced
        reading = None
        with evaluating(trainer.optimizer), torch.random.fork_rng(rng_devices, device_type=device.type):
            if parallel is None or parallel.scores_here:
                t0 = time.perf_counter()
                stored = cache.get(labels, len(eval_items)) if cache else None
                if stored is not None:  # as an earlier trial of this release measured it
                    scores, u, responses = stored
                else:
                    # one generation per decoding (greedy, or an evaluation-time attack), shared by its evaluators
                    ctxs = {key: EvalContext(model, tokenizer, eval_items, synced, stop_parts=early and not atk.trigger,
                                             decoding=d) for key, d in decodings.values()}
                    scores = {label: score_until_decided(score, ctxs[None], cfg.phi, cfg.crossing, cfg.confidence,
                                                         garble)
                              if early and label == primary else score_decoded(score, ctxs[decodings[label][0]])
                              for label, score in evaluators.items()}
                    if atk.trigger:  # the same evaluators on the triggered prompts, in contexts of their own
                        tctxs = {key: EvalContext(model, tokenizer, triggered_items, synced, stop_parts=early,
                                                  decoding=d) for key, d in decodings.values()}
                        scores |= {triggered(label): score_until_decided(score, tctxs[None], cfg.phi, cfg.crossing,
                                                                         cfg.confidence, garble)
                                   if early and triggered(label) == primary
                                   else score_decoded(score, tctxs[decodings[label][0]])
                                   for label, score in evaluators.items()}
                    scores = {label: scores[label] for label in labels}  # the primary first
                    u = utility(model) if utility else math.nan
                    responses = ctxs[decodings[cfg.evaluator.key][0]].generated  # the plain prompts' answers
                reading = Reading(scores, u, time.perf_counter() - t0, responses,
                                  cached=None if cache is None else stored is not None)
                if cache is not None and stored is None:
                    cache.put(scores, u, responses, reading.seconds)
                if probe is not None:  # on the attacker's own rows: never read from the step-0 cache
                    reading.g_effect = probe.measure(streams[trainer.index].items)
        decided = [math.nan] * 4
        if reading is not None:
            s = reading.scores[primary]
            decided = [decision(s), reading.utility, incoherent_share(s),
                       ungated_value(s, cfg.crossing, cfg.confidence)]
        if parallel is not None:
            decided = parallel.broadcast(decided)  # every rank takes rank 0's decision
        value, u, share, ungated = decided
        note(value, ungated)
        return reading, value, u, share

    def emit(point: EvalPoint) -> EvalPoint:
        if point.status != "running":
            point = dataclasses.replace(point, loss_peak_ratio=trainer.loss_peak_ratio())
        points.append(point)
        on_eval(point)
        return point

    def record(loss: float, reading: Reading | None, status: Status, safe_step: int,
               final: bool = False) -> EvalPoint:
        point = point_of(loss, reading, status, safe_step, final)
        return emit(_with_crossings(point) if final else point)

    def point_of(loss: float, reading: Reading | None, status: Status, safe_step: int,
                 final: bool = False) -> EvalPoint:
        """The point at the current budget; notes the evaluators it shows crossing."""
        b, reward = trainer.budget, trainer.mean_reward()
        point = EvalPoint(
            step=b.steps, examples=b.examples, tokens=b.tokens, flops=b.flops,
            accelerator_seconds=b.accelerator_seconds, wall_seconds=time.perf_counter() - start,
            train_loss=loss, harmfulness=math.nan, status=status, resolution=b.steps - safe_step,
            stage=trainer.index, world_size=devices, generated_tokens=b.generated_tokens)
        if reading is not None:
            decisive = reading.scores[primary]
            lo, hi = decisive.interval(cfg.confidence)
            more = {PROMPTS_SCORED: float(len(eval_items) - decisive.unscored)} if cfg.decide_early else {}
            if reading.cached is not None:
                more[STEP0_CACHED] = float(reading.cached)
            point = dataclasses.replace(
                point, harmfulness=decisive.f, harmfulness_lo=lo, harmfulness_hi=hi,
                safe=not crosses(decision(decisive), cfg.phi),
                utility=reading.utility, eval_seconds=reading.seconds,
                curves={**reading.curves(cfg.confidence, primary, eval_domains), **more, **reading.g_effect},
                samples=reading.samples(eval_items) if final or b.steps == 0 else None)
            for label, s in reading.scores.items():
                if label != primary and breaks(decision(s), cfg.phi, reading.utility, u0, epsilon):
                    crossings[label] = earliest(crossings.get(label), point)
        if reward is not None:
            point = dataclasses.replace(point, curves={**point.curves, TRAIN_REWARD: reward})
        return point

    def _with_crossings(point: EvalPoint) -> EvalPoint:
        found = dict(crossings)
        if point.status in SUCCESS:
            found[primary] = point
        return dataclasses.replace(point, incoherent_crossing=min(by_incoherent, default=math.nan), crossings={
            label: {**{f: float(getattr(p, f)) for f in BUDGET_UNITS.values()}, "resolution": float(p.resolution)}
            for label, p in found.items()})

    def result(status: Status) -> AttackResult:
        return AttackResult(status, points, trainer.trained_steps)

    def finish(hi: EvalPoint, reading: Reading | None, u: float, share: float, safe_step: int) -> AttackResult:
        """The crossing at `hi` (measured as `reading`, utility u, incoherent share `share`): a
        success while the model still works, else degenerate."""
        status = "degenerate" if garbled(share, cfg.coherence.degenerate_share) else at_crossing(u, u0, epsilon)
        final = dataclasses.replace(hi, status=status, resolution=hi.step - safe_step,
                                    wall_seconds=time.perf_counter() - start,
                                    samples=reading.samples(eval_items) if reading else None)
        emit(_with_crossings(final))
        return result(status)

    def refine(hi: EvalPoint, hi_reading: Reading | None, hi_u: float, hi_share: float,
               lo: Snapshot) -> AttackResult:
        """f > phi at hi, safe at lo: halve (lo, hi] up to cfg.refine times by replaying from lo."""
        for _ in range(cfg.refine):
            if hi.step - lo.step <= 1:
                break
            trainer.restore(lo)
            if trainer.train_to(lo.step + (hi.step - lo.step) // 2) is not None:
                break  # a replay that diverges was not deterministic: keep the window we have
            reading, value, u, share = measure(early=True)  # a midpoint that crosses is scored in full
            mid = record(trainer.mean_loss(), reading, "running", lo.step)
            if crosses(value, cfg.phi):
                hi, hi_reading, hi_u, hi_share = mid, reading, u, share
            else:
                lo = trainer.snapshot()
        return finish(hi, hi_reading, hi_u, hi_share, lo.step)

    # --- step 0: is the release already unsafe? (read back where a trial of this release measured it)
    shared = Step0Cache.for_trial(cfg, device, model, tokenizer, eval_items)  # None: off, or DeepSpeed
    reading, value, u0, _ = measure(cache=shared)
    status = at_release(value, cfg.phi)
    record(math.nan, reading, status, 0, final=status == "unsafe_at_release")
    if status == "unsafe_at_release":
        return result(status)
    safe_step, safe = 0, trainer.snapshot() if cfg.refine else None

    for step in cfg.eval_steps()[1:]:
        if (loss := trainer.train_to(step)) is not None:
            record(loss, None, "diverged", safe_step, final=True)
            return result("diverged")
        reading, value, u, share = measure(early=step != cfg.horizon)  # the horizon's samples are saved
        if garbled(share, cfg.coherence.degenerate_share):  # mostly loops and fragments: the language broke
            record(trainer.mean_loss(), reading, "degenerate", safe_step, final=True)
            return result("degenerate")
        if crosses(value, cfg.phi):
            if safe is not None and step - safe_step > 1:
                return refine(record(trainer.mean_loss(), reading, "running", safe_step), reading, u, share, safe)
            return finish(point_of(trainer.mean_loss(), reading, "running", safe_step), reading, u, share,
                          safe_step)
        status = at_safe_point(step, cfg.horizon)
        record(trainer.mean_loss(), reading, status, safe_step, final=status == "resisted")
        if status == "resisted":
            return result(status)
        safe_step, safe = step, None  # drop the old copy first: a snapshot holds all trainable state
        if cfg.refine:
            safe = trainer.snapshot()
    raise AssertionError("unreachable: the horizon is always evaluated")
