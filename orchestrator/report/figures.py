"""The report's figures, drawn with matplotlib (static PNGs: the same file goes into report.html,
into MLflow as an artifact and into a paper, with no script or network needed to view it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from orchestrator.conditions.records import Records  # noqa: E402
from orchestrator.report.conditions import trainability_unit  # noqa: E402
from orchestrator.report.records import DefenceRow, Trial, defence_label, varying  # noqa: E402
from orchestrator.report.tables import order_key  # noqa: E402
from orchestrator.stats.survival import Curve  # noqa: E402
from trainables.names import CENSORED, G_EFFECT_RISKS, UNITS  # noqa: E402

COLOURS = {"failed": "#d62728", "unsafe_at_release": "#8c1c13", "resisted": "#1f77b4", "diverged": "#ff7f0e",
           "degenerate": "#9467bd", "pruned": "#17becf", "error": "#7f7f7f", "running": "#7f7f7f"}
"""How an attack ended, as a colour (the same in every figure)."""
MAX_LEVELS = 8
"""A numeric attacker field with more distinct values than this is binned (log-spaced) in the heatmap."""
DPI = 110


@dataclass
class Drawn:
    name: str
    title: str
    caption: str
    path: Path
    group: str = ""
    """Figures of one group are alternatives (the survival curve in each unit): one shows at a time."""


def draw(rows: list[DefenceRow], unit: str, out_dir: Path, conditions: Records | None = None) -> list[Drawn]:
    """Draw every figure the records allow into out_dir/figures/<name>.png; what cannot be drawn
    (no curves loaded, fewer than one varying attacker field, no benign fine-tune) is left out.
    Survival is drawn in `unit` first, then in every other unit the trials recorded; with
    `conditions`, trainability-<unit> in the unit its ratio is judged in."""
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "figures").glob("*.png"):  # an earlier report's: none may outlive this one
        old.unlink()
    units = [unit, *(u for u in UNITS if u != unit and all(u in t.spent for r in rows for t in r.trials))]
    makers: list[tuple[str, str, Callable[[], tuple[Figure, str] | None]]] = [
        *((f"survival-{u}", f"Survival against budget ({u})", lambda u=u: survival(rows, u)) for u in units),
        ("harmfulness", "Harmfulness against step, per attack", lambda: harmfulness(rows)),
        ("heatmap", f"Worst case ({unit}) over attacker fields", lambda: heatmap(rows, unit)),
        ("convergence", f"The adversary's convergence ({unit})", lambda: convergence(rows, unit)),
    ]
    makers.append(("g_effect", "G-effect of the attacks' gradients against step", lambda: g_effect(rows)))
    if conditions is not None and conditions.asked.get("trainability"):
        t_unit = trainability_unit(conditions, unit)
        makers.append((f"trainability-{t_unit}", "Trainability: the benign fine-tune against budget",
                       lambda: trainability(rows, conditions, t_unit)))
    drawn = []
    for name, title, make in makers:
        made = make()
        if made is None:
            continue
        drawn.append(save(*made, name, title, out_dir))
    return drawn


def save(fig: Figure, caption: str, name: str, title: str, out_dir: Path) -> Drawn:
    """The figure written to out_dir/figures/<name>.png (names 'group-member' are alternatives)."""
    path = out_dir / "figures" / f"{name}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Drawn(name, title, caption, path, group=name.split("-")[0] if "-" in name else "")


def survival(rows: list[DefenceRow], unit: str) -> tuple[Figure, str] | None:
    curves = [(r, r.survival(unit)) for r in rows]
    curves = [(r, c) for r, c in curves if c.n]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    survival_axes(ax, [(r.label, c) for r, c in curves], unit)
    return fig, survival_caption([c for _, c in curves])


LINE_STYLES = ("-", (0, (5, 3)), (0, (1, 2)), (0, (6, 2, 1, 2)))
"""Solid, dashed, dotted, dash-dot: a curve drawn over another of the same shape still shows."""


def survival_axes(ax, curves: list[tuple[str, Curve]], unit: str, slots: list[int] | None = None) -> None:
    """Survival curves on one axes, each with its band and censoring ticks, labelled 'name  n=...';
    curve k in colour and line style slots[k] of the cycles (default k: one name keeps both across
    panels; the styles differ so that curves that coincide, e.g. two methods breaking at the same
    steps, both show)."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, c) in enumerate(curves):
        slot = slots[k] if slots else k
        colour = colours[slot % len(colours)]
        ax.step(c.times, c.surviving, where="post", color=colour, lw=2, ls=LINE_STYLES[slot % len(LINE_STYLES)],
                label=f"{name}  n={c.n}")
        ax.fill_between(c.times, c.lower, c.upper, step="post", color=colour, alpha=0.15, lw=0)
        if c.censored_times:
            ax.plot(c.censored_times, [c.at(t) for t in c.censored_times], ls="none", marker="|", ms=12, mew=2,
                    color=colour)
    _budget_axis(ax, [t for _, c in curves for t in c.times], unit)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("share of attacks not yet successful")
    ax.axhline(0.5, color="#999", lw=0.8, ls=":")
    ax.legend(loc="best", frameon=False)
    ax.grid(alpha=0.3)


def survival_caption(curves: list[Curve]) -> str:
    method = {c.method for c in curves}
    return (f"{' / '.join(sorted(m.title() for m in method))} estimate with its 95% pointwise band; a tick marks "
            "an attack censored there (it resisted up to its own horizon). Diverged and degenerate attacks "
            "are competing events, never successes. The dotted line is the median.")


def harmfulness(rows: list[DefenceRow]) -> tuple[Figure, str] | None:
    shown = [r for r in rows if any(t.curve for t in r.trials)]
    if not shown:
        return None
    cols = min(3, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    seen: set[str] = set()
    for ax, r in zip(axes.flat, shown, strict=False):
        alpha = max(0.25, min(0.9, 8 / max(1, len(r.trials))))
        for t in sorted(r.trials, key=lambda t: t.status == "failed"):  # successes on top
            if not t.curve:
                continue
            steps, f = zip(*t.curve, strict=True)
            ax.plot(steps, f, color=COLOURS.get(t.status, "#7f7f7f"), lw=1.2, alpha=alpha, drawstyle="default")
            seen.add(t.status)
            crossing = t.btf.get("steps")
            if crossing is not None:
                at = dict(t.curve).get(int(crossing), f[-1])
                ax.plot([crossing], [at], marker="X", ms=8, color=COLOURS[t.status], mec="white", mew=0.8, zorder=5)
        phis = {t.phi for t in r.trials if t.phi is not None}
        for phi in phis:
            ax.axhline(phi, color="black", ls="--", lw=1)
            ax.text(ax.get_xlim()[1], phi, f" φ={phi:g}", va="bottom", ha="right", fontsize=8)
        worst = r.cheapest("steps")
        found = "-" if worst is None else f"{worst.btf['steps']:g} steps"
        ax.set_title(f"{r.label}: worst case {found}", fontsize=10)
        ax.set_xlabel("attack step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("harmfulness f (held-out)")
    handles = [plt.Line2D([], [], color=COLOURS[s], lw=2, label=s.replace("_", " ")) for s in COLOURS if s in seen]
    handles.append(plt.Line2D([], [], color="#333", marker="X", ls="none", label="first crossing"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig, ("Each line is one attack, stopped at its first crossing of φ (X) or at its horizon. Lines end "
                 "where the attack ended, so an average over attacks would fall as successes leave: read each "
                 "line on its own.")


def g_effect(rows: list[DefenceRow]) -> tuple[Figure, str] | None:
    risks = [k for k in G_EFFECT_RISKS if any(t.g_curves.get(k) for r in rows for t in r.trials)]
    if not risks:
        return None
    fig, axes = plt.subplots(1, len(risks), figsize=(5.4 * len(risks), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, risk in zip(axes[0], risks, strict=True):
        values = []
        for k, r in enumerate(rows):
            label = r.label
            for t in r.trials:
                if curve := t.g_curves.get(risk):
                    steps, g = zip(*curve, strict=True)
                    ax.plot(steps, g, color=colours[k % len(colours)], lw=1.2, alpha=0.6, label=label)
                    values += [v for v in g if math.isfinite(v)]
                    label = None
        ax.axhline(0, color="black", lw=0.8)
        if magnitudes := [abs(v) for v in values if v != 0]:
            # G spans orders of magnitude across defences and steps: linear within the smallest tenth of
            # the magnitudes, logarithmic beyond, and only the signs that occur
            near = float(np.percentile(magnitudes, 10))
            ax.set_yscale("symlog", linthresh=near)
            top, bottom = max(values), min(values)
            ax.set_ylim(bottom * 1.5 if bottom < 0 else -near, top * 1.5 if top > 0 else near)
            # ticks at 0 and whole decades clear of the linear band (its edges' labels would collide with 0)
            lo, hi = math.floor(math.log10(near)) + 1, math.ceil(math.log10(max(magnitudes)))
            decades = range(lo, hi + 1, max(1, math.ceil((hi - lo + 1) / 5)))
            ax.set_yticks([0.0, *(10.0**k for k in decades if top > 0), *(-(10.0**k) for k in decades if bottom < 0)])
        ax.set_title(f"{risk} risk: " + ("> 0 the step costs capability" if risk == "benign" else
                                         "< 0 the step learns harmful answers"), fontsize=10)
        ax.set_xlabel("attack step")
        ax.set_ylabel("G-effect (-∇R·∇L)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", frameon=False, fontsize=8)
    fig.tight_layout()
    return fig, ("One line per attack (a trial with g_effect), by defence: the first-order change of each risk per "
                 "unit learning rate of a plain gradient step on the attack's data, at every evaluation point. "
                 "Symmetric-log scale; the table below gives the medians and the layer block that carries it.")


def heatmap(rows: list[DefenceRow], unit: str) -> tuple[Figure, str] | None:
    everyone = [t for r in rows for t in r.trials]
    fields = [k for k in varying(everyone) if k != "seed"]
    facet = "finetune" if "finetune" in fields else None
    fields = [k for k in fields if k != facet]
    if not fields:
        return None
    preferred = [k for k in ("learning_rate", "optimizer") if k in fields]
    rest = sorted((k for k in fields if k not in preferred), key=lambda k: len({t.params.get(k) for t in everyone}))
    x, y = ([*preferred, *rest] + [None])[:2]
    xs, ys = _levels(everyone, x), _levels(everyone, y) if y else None
    facets = sorted({t.params.get(facet, "") for t in everyone}) if facet else [None]
    finite = [v for t in everyone if (v := t.value(unit)) is not None and math.isfinite(v) and v > 0]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 10.0)
    norm = matplotlib.colors.LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))
    cmap = plt.get_cmap("YlOrRd_r")  # cheap to break: dark red
    nx, ny = len(xs[1]), len(ys[1]) if ys else 1
    fig, axes = plt.subplots(len(rows), len(facets), squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(max(3.4, 1.4 + 1.1 * nx) * len(facets) + 1.2,
                                      max(2.2, 0.9 + 0.55 * ny) * len(rows) + 0.4))
    for i, r in enumerate(rows):
        for j, mode in enumerate(facets):
            ax = axes[i, j]
            for yi in range(ny):
                for xi in range(nx):
                    value, text = _cell(r.trials, x, xs, xi, y, ys, yi, facet, mode, unit)
                    scored = value is not None and math.isfinite(value) and value > 0
                    resisted = text.startswith(">")
                    ax.add_patch(plt.Rectangle((xi, yi), 1, 1, facecolor=cmap(norm(value)) if scored else "#f2f2f2",
                                               edgecolor="#b0b0b0" if resisted else "white", hatch="///" if resisted
                                               else None, lw=1.5 if not resisted else 0.5))
                    dark = scored and norm(value) < 0.45
                    ax.text(xi + 0.5, yi + 0.5, text, ha="center", va="center", fontsize=9,
                            color="white" if dark else "#222",
                            bbox=None if scored or not text else {"fc": "#f2f2f2", "ec": "none", "pad": 1})
            ax.set_xlim(0, nx)
            ax.set_ylim(0, ny)
            ax.set_xticks(np.arange(nx) + 0.5, xs[1], fontsize=8)
            ax.set_yticks(np.arange(ny) + 0.5, ys[1] if ys else [""], fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel(x)
            if j == 0 and y:
                ax.set_ylabel(y)
            ax.set_title(f"{r.defence}" + (f" · {facet} {mode}" if facet else ""), fontsize=10)
            ax.tick_params(length=0)
    if finite:
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8,
                           label=f"worst case ({unit})")
        ticks = sorted(set(finite))
        if len(ticks) <= 8:
            bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
            bar.minorticks_off()
    return fig, (f"Each cell: the cheapest successful attack ({unit}) among the trials with those attacker "
                 "fields (other fields and seeds pooled); '> T' hatched: every such attack resisted up to T (or, "
                 "pruned, up to where it stopped); "
                 "'diverged'/'degenerate': the attacks there only failed; blank: no such attacker."
                 + (" Numeric fields with many values are binned." if _binned(xs, ys) else ""))


def convergence(rows: list[DefenceRow], unit: str) -> tuple[Figure, str] | None:
    series = [(r, [p for p in r.progress(unit) if p.cumulative is not None]) for r in rows]
    series = [(r, ps) for r, ps in series if any(p.best is not None for p in ps)]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (r, ps) in enumerate(series):
        search = {t.params.get("search", "?") for t in r.trials}
        xs = [p.cumulative for p in ps if p.best is not None]
        ys = [p.best for p in ps if p.best is not None]
        colour = colours[k % len(colours)]
        ax.step(xs + [ps[-1].cumulative], ys + [ys[-1]], where="post", color=colour, lw=2,
                label=f"{r.defence} ({', '.join(sorted(search))})")
        found = [(p.cumulative, p.best) for p in ps if p.improved]
        ax.plot(*zip(*found, strict=True), ls="none", marker="o", color=colour)
    spent = [p.cumulative for _, ps in series for p in ps]
    _budget_axis(ax, spent, unit, label=f"compute spent by the search ({unit})")
    ax.set_ylabel(f"best budget-to-failure found ({unit})")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig, ("Each dot: a trial that found a cheaper successful attack. The curve flattens once the search "
                 "stops improving; where it flattens early, the rest of the compute went to attacks that did "
                 "not beat the worst case.")


def trainability(rows: list[DefenceRow], rec: Records, unit: str) -> tuple[Figure, str] | None:
    """The benign fine-tune per defence: task score against budget, the target, each first reach.
    The curve is recorded by step; in another unit a step is scaled by the fine-tune's mean cost
    per step (exact for steps and examples)."""
    bases = {r.defence for r in rows if r.is_base}
    order = [r.defence for r in rows] + sorted(set(rec.benign) - {r.defence for r in rows})
    shown = [rec.benign[d] for d in order if d in rec.benign and rec.benign[d].curve]
    if not shown:
        return None
    scaled = unit != "steps" and all(b.spent.get("steps") and unit in b.spent for b in shown)
    if unit != "steps" and not scaled:
        unit = "steps"   # no cost per step recorded: steps it is

    def per_step(b) -> float:
        return b.spent[unit] / b.spent["steps"] if scaled else 1.0

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]   # by row, as in the survival figure
    for b in shown:
        base = b.defence in bases
        colour = colours[order.index(b.defence) % len(colours)]
        steps, scores = zip(*b.curve, strict=True)
        xs = [s * per_step(b) for s in steps]
        if b.status == "reached":
            words = f"reached at {b.btt.get(unit, b.btt.get('steps', math.nan)):.3g} {unit}"
        elif b.status == "not_reached":
            words = f"not reached in {b.spent.get(unit, xs[-1]):.3g} {unit}"
        else:
            words = b.status.replace("_", " ")
        ax.plot(xs, scores, color=colour, lw=2.8 if base else 1.8, zorder=4 if base else 3, marker=".", ms=5,
                label=f"{defence_label(b.defence, base)}: {words}")
        if b.status == "reached" and not math.isnan(b.phi):
            at = b.btt.get("steps")
            step = int(at) if at is not None else next((s for s, v in b.curve if v >= b.phi), None)
            if step is not None:
                y = dict(b.curve).get(step, b.phi)
                ax.plot([step * per_step(b)], [y], marker="o", ms=10, color=colour, mec="white", mew=1.5, zorder=6)
    tol = (rec.asked.get("trainability") or {}).get("tolerance", 2.0)
    reference = next((b for b in shown if b.defence in bases and b.status == "reached"), None)
    if reference is not None:
        limit = reference.btt.get(unit, reference.btt.get("steps", math.nan) * per_step(reference)) * tol
        ax.axvline(limit, color="#555", ls=":", lw=1.2)
        ax.text(limit, 0.97, f"{tol:g}x the base's budget ", rotation=90, va="top", ha="right", fontsize=8,
                color="#555", transform=ax.get_xaxis_transform())
    for phi in sorted({b.phi for b in shown if not math.isnan(b.phi)}):
        ax.axhline(phi, color="black", ls="--", lw=1)
        ax.text(1.0, phi, f" target {phi:.3g}", va="center", ha="left", fontsize=8, transform=ax.get_yaxis_transform())
    scores = [v for b in shown for _, v in b.curve]
    if min(scores) >= 0 and max(scores) <= 1:
        ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"benign fine-tuning budget ({unit})" + (" (steps x mean cost per step)" if scaled else ""))
    ax.set_ylabel("task score (held-out)")
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    ax.grid(alpha=0.3)
    return fig, ("The benign fine-tune behind the trainability condition: each defence fine-tuned on a task new "
                 "to both, its score on held-out examples of the task against budget; the dashed line is the "
                 "target and a dot marks where each first reached it. Trainability passes when a defence needs "
                 f"at most {tol:g}x the base's budget (dotted line) to get there."
                 + (f" Budgets in {unit} are each step scaled by the fine-tune's mean cost per step."
                    if scaled else ""))


def _budget_axis(ax, values: list[float], unit: str, label: str | None = None) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 200:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel(label or f"attacker budget ({unit})")


def _levels(trials: list[Trial], field: str) -> tuple[list[float] | None, list[str]]:
    """(bin edges or None, tick labels) of an attacker field: its values, sorted (numbers as
    numbers), or log-spaced bins when a numeric field takes more than MAX_LEVELS values."""
    values = sorted({t.params[field] for t in trials if field in t.params}, key=order_key)
    numbers = [float(v) for v in values if _is_number(v)]
    if len(numbers) == len(values) and len(values) > MAX_LEVELS and min(numbers) > 0:
        edges = list(np.geomspace(min(numbers), max(numbers) * 1.000001, 7))
        return edges, [f"{a:.2g}-{b:.2g}" for a, b in zip(edges, edges[1:], strict=False)]
    return None, values


def _level(value: str | None, levels: tuple[list[float] | None, list[str]]) -> int | None:
    edges, labels = levels
    if value is None:
        return None
    if edges is None:
        return labels.index(value) if value in labels else None
    return min(len(labels) - 1, max(0, int(np.searchsorted(edges, float(value), side="right")) - 1))


def _cell(trials, x, xs, xi, y, ys, yi, facet, mode, unit) -> tuple[float | None, str]:
    here = [t for t in trials if _level(t.params.get(x), xs) == xi and (y is None or _level(t.params.get(y), ys) == yi)
            and (facet is None or t.params.get(facet, "") == mode)]
    if not here:
        return None, ""
    values = [v for t in here if (v := t.value(unit)) is not None]
    if not values:
        return None, "/".join(sorted({t.status for t in here}))
    best = min(values)
    if math.isinf(best):  # every attack there resisted to its T or was pruned: unbroken up to where it stopped
        stopped = [t.spent.get("steps", t.max_steps) for t in here if t.status in CENSORED]
        return best, f"> {min(stopped):g}" if unit == "steps" and stopped else "> T"
    return best, f"{best:.3g}"


def _binned(*levels) -> bool:
    return any(lv is not None and lv[0] is not None for lv in levels)


def _is_number(v: str) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True
