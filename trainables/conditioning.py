"""Immunisation as differential conditioning (Zheng, Bai, Bullins & Yeh, "Model Immunization from
a Condition Number Perspective", ICML 2025; §1.4.4 of the reference text): how ill-conditioned a
checkpoint makes the harmful task's Hessian, against the benign task's, as a ratio to the base."""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from trainables.attacker import Strict
from trainables.hessian import Extremes
from trainables.names import Metric, Tag

TASKS: tuple[str, ...] = ("harmful", "benign")
Verdict = Literal["ok", "singular", "indefinite", "zero", "unconverged"]
MAX_DIM = 20_000_000
"""Largest Hessian measured: Lanczos keeps ~64 vectors of its dimension (float64), 10 GB here."""
ZERO = 1e-10
"""An eigenvalue below ZERO x the spectrum's scale cannot be told from 0 by float64 products."""


class Conditioning(Strict):
    """The condition-number diagnostic of every defence's checkpoint at release."""

    head: Literal["least_squares", "cross_entropy"] = "least_squares"
    """The linear head the Hessian is taken in: least_squares (the paper's theory: ΦᵀΦ/n of the
    frozen features) or cross_entropy (the model's own output rows on the task's label set)."""
    parameters: list[str] | None = Field(None, min_length=1)
    """Instead of a head: fnmatch patterns of the model's parameter names (e.g. 'model.layers.1.mlp.*')
    whose Hessian of the task's language-model loss is taken, the rest frozen (not PSD in general)."""
    size: int = Field(64, gt=0)
    """The first `size` rows of each task's split."""
    rtol: float = Field(1e-4, gt=0, lt=1)
    """Relative accuracy asked of each extreme eigenvalue (checked by its residual)."""
    max_matvecs: int = Field(3000, gt=10)
    """Hessian-vector products allowed per end before it is reported unconverged."""


@dataclass(frozen=True)
class Kappa:
    """κ of one task's Hessian, or why there is none."""

    verdict: Verdict
    value: float
    """κ (verdict ok), the lower bound it exceeds (singular with λmax > 0), else nan."""
    low: float = math.nan
    high: float = math.nan
    """The interval the ends' error bounds allow κ (verdict ok)."""
    why: str = ""

    @staticmethod
    def of(ends: Extremes) -> Kappa:
        top, bottom, scale = ends.top, ends.bottom, ends.scale
        if not ends.converged:
            return Kappa("unconverged", math.nan, why=f"Lanczos did not reach rtol within {ends.matvecs} products")
        if scale <= 0 or top.value <= max(top.error, ZERO * scale):
            return Kappa("zero", math.nan, why="the Hessian is 0 on these parameters (e.g. LoRA's A while B = 0)")
        if bottom.value < -max(bottom.error, ZERO * scale):
            return Kappa("indefinite", math.nan, why=f"λmin = {bottom.value:.3g} < 0: not PSD, so κ bounds no "
                         "convergence rate; both ends are reported")
        if bottom.value - bottom.error <= ZERO * scale:
            bound = top.value / max(bottom.value + bottom.error, ZERO * scale)
            return Kappa("singular", bound, why=f"λmin = {bottom.value:.3g} is not resolved from 0 (error "
                         f"{bottom.error:.2g}): κ ≥ {bound:.3g}")
        return Kappa("ok", top.value / bottom.value, (top.value - top.error) / (bottom.value + bottom.error),
                     (top.value + top.error) / (bottom.value - bottom.error))


def rir(defence: dict[str, float], base: dict[str, float]) -> float:
    """(κ_harmful(defence)/κ_harmful(base)) / (κ_benign(defence)/κ_benign(base)); nan unless all four κ
    are measured (verdict ok)."""
    k = [defence.get("harmful"), base.get("harmful"), defence.get("benign"), base.get("benign")]
    if any(x is None or not math.isfinite(x) or x <= 0 for x in k):
        return math.nan
    return (k[0] / k[1]) / (k[2] / k[3])


# --- measuring one checkpoint ------------------------------------------------------------------


def measure(checkpoint, data, benign_source, cfg: Conditioning, device: str = "cpu") -> dict[str, Any]:
    """Each task's Hessian ends and κ for one checkpoint: {task: {"ends": Extremes, "kappa": Kappa,
    "rows": positions, "seconds": ...}}. `data`: the sweep's Data (data.attack is the harmful task,
    its formatting rules apply to both); `benign_source`: the benign task's DataSource."""
    import torch

    from trainables import data as D
    from trainables.checkpoint import load_model, load_tokenizer, resolve_device
    from trainables.hessian import extremes, hvp_of

    dev = resolve_device(device)
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, dev)
    model.eval()
    out = {}
    for task, src in zip(TASKS, (data.attack, benign_source), strict=True):
        t0 = time.perf_counter()
        rows = D.load_rows(src)[: cfg.size]
        if not rows:
            raise ValueError(f"conditioning: the {task} task's split {src.source!r} has no rows")
        batch = D.collate(D.tokenize_rows(tokenizer, rows, src, data), tokenizer.pad_token_id)
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.random.fork_rng(devices=[]):
            loss, x0, positions = (_model_loss(model, batch, cfg.parameters) if cfg.parameters
                                   else _head_loss(model, batch, cfg.head))
            ends = extremes(hvp_of(loss, x0), x0.numel(), cfg.rtol, cfg.max_matvecs)
        out[task] = {"ends": ends, "kappa": Kappa.of(ends), "rows": positions,
                     "seconds": time.perf_counter() - t0}
    return out


def features(model, batch: dict) -> tuple[Any, Any]:
    """What the output head reads at each position that predicts a response token (float64), and
    the token it predicts there: (Φ [n, d], y [n])."""
    import torch

    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("conditioning: the model has no output head (get_output_embeddings() is None) whose "
                         "features could be read; use conditioning.parameters instead")
    seen = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hook.remove()
    hidden = seen[-1][:, :-1]            # position t predicts token t + 1
    target = batch["labels"][:, 1:]
    keep = target != -100
    return hidden[keep].double(), target[keep]


def _head_loss(model, batch: dict, head: str):
    """The task's loss as a function of a flat linear head on the frozen features, the point the
    Hessian is taken at, and the feature rows."""
    import torch

    phi, y = features(model, batch)
    n, d = phi.shape
    if head == "least_squares":  # ½ mean (Φw - t)²: Hessian ΦᵀΦ/n at any w, for any target t
        return (lambda w: 0.5 * (phi @ w).pow(2).mean()), torch.zeros(d, dtype=phi.dtype, device=phi.device), n
    labels, y = torch.unique(y, return_inverse=True)    # the task's label set, y re-indexed into it
    k = len(labels)
    if k < 2:
        raise ValueError("conditioning.head cross_entropy: the task's responses hold a single token; "
                         "use head: least_squares")
    if (k - 1) * d > MAX_DIM:
        raise ValueError(f"conditioning.head cross_entropy: {k} labels x {d} features is more than {MAX_DIM:,} "
                         "parameters; lower conditioning.size or use head: least_squares")
    rows = model.get_output_embeddings().weight.detach()[labels].double()     # the model's own head
    # orthonormal basis of the sum-zero subspace of R^k: the directions that change probabilities
    basis = torch.linalg.qr(torch.eye(k, dtype=phi.dtype, device=phi.device) - 1.0 / k)[0][:, : k - 1]

    def loss(u):
        w = rows + basis @ u.reshape(k - 1, d)
        return torch.nn.functional.cross_entropy(phi @ w.T, y)

    return loss, torch.zeros((k - 1) * d, dtype=phi.dtype, device=phi.device), n


def _model_loss(model, batch: dict, patterns: list[str]):
    """The task's language-model loss as a function of the flat parameters matching `patterns`
    (float64, eager attention: double backward through SDPA is not always implemented)."""
    import torch

    model.double().requires_grad_(False)   # frozen: only the flat vector below is differentiated
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"conditioning.parameters: no parameter name matches {patterns}; names look like "
                         f"{next(iter(dict(model.named_parameters())))!r}")
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    if (n := sum(params[name].numel() for name in names)) > MAX_DIM:
        raise ValueError(f"conditioning.parameters: {n:,} parameters match, more than {MAX_DIM:,} (Lanczos keeps ~64 "
                         "vectors that long); name fewer, e.g. one layer's")
    x0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [math.prod(s) for s in shapes]
    positions = int((batch["labels"][:, 1:] != -100).sum())

    def loss(flat):
        parts = {n: p.reshape(s) for n, p, s in zip(names, torch.split(flat, sizes), shapes, strict=True)}
        return torch.func.functional_call(model, parts, args=(), kwargs=batch).loss

    return loss, x0, positions


def records(measured: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """`measure`'s result as a diagnostic run's metrics and tags (names.Metric.conditioning, Tag.VERDICT)."""
    metrics, tags = {}, {}
    for task, r in measured.items():
        ends, kappa = r["ends"], r["kappa"]
        values = {"kappa": kappa.value, "kappa_low": kappa.low, "kappa_high": kappa.high,
                  "lambda_max": ends.top.value, "lambda_min": ends.bottom.value,
                  "lambda_max_error": ends.top.error, "lambda_min_error": ends.bottom.error,
                  "matvecs": ends.matvecs, "rows": r["rows"], "dim": ends.dim, "seconds": r["seconds"]}
        assert set(values) == set(Metric.CONDITIONING)
        metrics.update({Metric.conditioning(q, task): float(v) for q, v in values.items()})
        tags[f"{Tag.VERDICT}.{task}"] = kappa.verdict
        if kappa.why:
            tags[f"{Tag.WHY}.{task}"] = kappa.why
    return metrics, tags
