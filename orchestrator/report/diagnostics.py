"""The diagnostics as tables: each defence's conditioning at release (κ of the harmful and the
benign task's Hessian, RIR against the base; trainables/conditioning.py) beside its worst case,
and the G-effect of its attacks' gradients (trainables/g_effect.py) summarised per defence. The
arithmetic is in trainables; this module only writes it down."""

from __future__ import annotations

import math
import statistics

from orchestrator.conditions.records import Diagnostic, rirs
from orchestrator.report.records import DefenceRow, defence_label
from orchestrator.report.tables import Table, worst_cell
from trainables.conditioning import TASKS
from trainables.names import G_EFFECT_RISKS, G_TOTAL, Metric

CONDITIONING_LEGEND = (
    "Conditioning at release (Zheng, Bai, Bullins & Yeh, ICML 2025): κ = λmax/λmin of each task's Hessian in a "
    "linear head on the model's frozen final features (least squares: the features' covariance), by Lanczos on "
    "Hessian-vector products. RIR = (κ_harmful / base's) / (κ_benign / base's): above 1, the defence made the "
    "harmful task harder to fine-tune than the benign one, in the paper's sense. κ is blind to a uniform scaling "
    "of the Hessian, so λmax / base's is shown beside it: a defence that slows attackers by scaling weights reads "
    "RIR ≈ 1 whatever its budget. '≥ x': λmin not resolved from 0, κ at least x; no κ where the Hessian is not "
    "PSD (both ends shown) or is 0.")

G_EFFECT_LEGEND = (
    "G-effect (Wang et al. 2025) of each attack's gradient: -∇R·∇L_attack, the first-order change of risk R per "
    "unit learning rate of a plain gradient step on the attack loss (> 0 raises R). Benign R: loss of held-out "
    "benign answers (the attack costs capability when > 0); harmful R: loss of compliant answers to held-out "
    "harmful prompts (the attack learns them when < 0). Medians over the defence's trials, at step 0 and at each "
    "trial's last point; the block is the layer block carrying the largest share of the harmful G-effect there "
    "(of the benign one where the eval split has no responses, so only the benign risk is measured). "
    "It uses the raw gradient, not Adam's step: it predicts SGD's effect, and only to first order.")


def _g(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def kappa_cell(d: Diagnostic | None, task: str) -> str:
    if d is None or task not in d.figures:
        return "not measured"
    f, verdict = d.figures[task], d.verdict.get(task, "")
    if verdict == "ok":
        k, lo, hi = f.get("kappa", math.nan), f.get("kappa_low", math.nan), f.get("kappa_high", math.nan)
        spread = (hi - lo) / 2 / k if k and math.isfinite(hi) else 0.0
        return _g(k) + (f" ± {spread:.0%}" if spread > 0.005 else "")
    if verdict == "singular":
        return f"≥ {_g(f.get('kappa', math.nan))} (λmin ≈ 0)"
    if verdict == "indefinite":
        return f"none: λ in [{_g(f.get('lambda_min'))}, {_g(f.get('lambda_max'))}]"
    return f"none: {verdict}"


def conditioning_table(rows: list[DefenceRow], diagnostics: dict[str, Diagnostic], unit: str) -> Table:
    """One row per defence: κ per task, λmax against the base's, RIR, the worst case beside them."""
    ref = next((d for d in diagnostics.values() if d.is_base), None)
    ratios = rirs(diagnostics)
    by_name = {r.defence: r for r in rows}
    body = []
    for name in [*by_name, *sorted(set(diagnostics) - set(by_name))]:
        d, row = diagnostics.get(name), by_name.get(name)
        scale = [_lambda_ratio(d, ref, task) for task in TASKS]
        ratio, is_base = ratios.get(name, math.nan), d is not None and d.is_base
        note = "; ".join(f"{t}: {w}" for t, w in (d.why.items() if d else []) if d.verdict.get(t) != "ok")
        if math.isfinite(ratio) and abs(ratio - 1) < 0.05 and not is_base and any(
                math.isfinite(x) and not 0.5 <= x <= 2 for x in scale):
            note = "; ".join(filter(None, [note, "RIR ≈ 1 with λmax moved: a uniform rescaling, which κ cannot see"]))
        body.append([defence_label(name, is_base),
                     *(kappa_cell(d, t) for t in TASKS), *(_g(x) + "x" if math.isfinite(x) else "-" for x in scale),
                     "1 (reference)" if is_base else _g(ratio) if d else "not measured",
                     worst_cell(row, unit) if row else "-", note or ("" if d else "no diagnostic run")])
    return ["defence", "κ harmful", "κ benign", "λmax harmful / base", "λmax benign / base", "RIR",
            f"worst case ({unit})", "note"], body


def _lambda_ratio(d: Diagnostic | None, ref: Diagnostic | None, task: str) -> float:
    """λmax of `task`'s Hessian over the base's (nan where either is missing)."""
    mine, theirs = (x.figures.get(task, {}).get("lambda_max") if x else None for x in (d, ref))
    return mine / theirs if mine and theirs else math.nan


def conditioning_csv(diagnostics: dict[str, Diagnostic]) -> Table:
    """The same as numbers: every figure of every task, verdicts, RIR."""
    ratios = rirs(diagnostics)
    header = ["defence", *(f"{q}_{t}" for t in TASKS for q in Metric.CONDITIONING), *(f"verdict_{t}" for t in TASKS),
              "rir"]
    body = [[name, *(d.figures.get(t, {}).get(q, "") for t in TASKS for q in Metric.CONDITIONING),
             *(d.verdict.get(t, "") for t in TASKS), "" if math.isnan(r := ratios.get(name, math.nan)) else r]
            for name, d in diagnostics.items()]
    return header, body


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def g_effect_table(rows: list[DefenceRow]) -> Table:
    """One row per defence whose trials measured the G-effect, and per fine-tuning mode where the
    trials vary it (LoRA's G-effect is over its adapters, full fine-tuning's over every weight:
    their medians would mix two different sums)."""
    modes = {t.params.get("finetune") for r in rows for t in r.trials if t.g_effect}
    body = []
    for r in rows:
        label = r.label
        for mode in sorted(modes, key=str):
            measured = [t for t in r.trials if t.g_effect and t.params.get("finetune") == mode]
            if measured:
                body.append([label + (f" · {mode}" if len(modes) > 1 else ""), str(len(measured)),
                             *_g_effect_cells(measured)])
    return ["defence", "trials", "benign at step 0", "benign at the end", "harmful at step 0", "harmful at the end",
            "block that carries it at the end"], body


def _g_effect_cells(measured: list) -> list[str]:
    """Medians of the totals at step 0 and at the end per risk, and the block that carries the harmful
    G-effect at the end (the benign one's where only it was measured), with its share."""
    cells = []
    for risk in G_EFFECT_RISKS:
        first = _median([t.g_curves[risk][0][1] for t in measured if t.g_curves.get(risk)])
        last = _median([t.g_effect.get(risk, {}).get(G_TOTAL) for t in measured])
        cells += [_g(first), _g(last)]
    risk = next(k for k in reversed(G_EFFECT_RISKS) if any(k in t.g_effect for t in measured))
    blocks = {b for t in measured for b in t.g_effect.get(risk, {}) if b != G_TOTAL}
    share = {b: _median([t.g_effect[risk].get(b) for t in measured if risk in t.g_effect]) for b in blocks}
    total = sum(abs(v) for v in share.values() if math.isfinite(v))
    top = max(share, key=lambda b: abs(share[b]) if math.isfinite(share[b]) else -1) if share else None
    return [*cells, f"{risk}: {top} ({abs(share[top]) / total:.0%})" if top and total > 0 else "-"]
