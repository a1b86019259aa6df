"""attack-sweep: how much fine-tuning compute does it take to break a defended model?

    attack-sweep demo                                  # toy world, embedded defaults
    attack-sweep validate SPEC.yaml [--set k=v ...]     # check a spec, print trials, budget and time
    attack-sweep run SPEC.yaml [--set k=v ...] [--address auto] [--tracking-uri URI]
    attack-sweep report --experiment NAME [--unit tokens] [--out DIR]

Every problem with the input is printed as one line naming the field, file or flag, with a
non-zero exit; `--debug` (before the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from importlib import resources
from pathlib import Path
from typing import NoReturn

# Light imports only (pydantic, yaml): --help and a spec's errors answer in about a second. Torch,
# transformers, MLflow and Ray are imported by the commands that use them (tests/test_startup.py).
from orchestrator import capacity, sigint
from orchestrator.spec.model import DEFAULT_TRACKING_URI, SpecError, safe_name
from trainables.names import BUDGET_UNITS

UNITS = tuple(BUDGET_UNITS)


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    for name in ("mlflow", "alembic", "ray", "ray.tune", "ray.train", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_validate(args: argparse.Namespace) -> int:
    sp = _load(args)
    from orchestrator.spec.estimate import estimate
    from orchestrator.spec.preflight import check
    from orchestrator.spec.space import max_horizon

    notes = check(sp, checkpoints=not args.skip_checkpoint_checks)
    if note := capacity.local_note(capacity.Ask.trial(sp.resources)):
        notes.append(note)
    cost, s, t_max = estimate(sp, args.tracking_uri), sp.search, max_horizon(sp.space, sp.max_steps)
    n = cost.total.trials
    print(f"spec OK: {sp.name}")
    print(f"  trials: {n} = {len(sp.defences)} defences x {n // len(sp.defences)} attackers ({s.algorithm} search"
          + (f", {s.n_initial} random first" if sp.adaptive else "") + ")")
    print(f"  adversary minimises budget-to-failure in {s.unit}; resisted/diverged/degenerate count as "
          f"{s.penalty:g} x T_max = {s.penalty * t_max:g} steps' worth"
          + (f"; cap {s.max_compute:g} {s.unit} per defence" if s.max_compute else "")
          + ("; pruned: an attack stops once it has spent, safe, the cheapest success's budget" if s.prune else ""))
    print(f"  per trial: {cost.per_trial}" + (f", crossings refined {sp.refine}x by bisection" if sp.refine else "")
          + f"; phi={sp.phi}" + (" (lower end of f's Wilson interval)" if sp.crossing == "lower_bound" else ""))
    names = ", ".join(e.key + (" (primary)" if i == 0 and sp.evaluators else "")
                      for i, e in enumerate(sp.all_evaluators))
    print(f"  evaluators: {names}")
    if sp.utility:
        print(f"  utility bound: {sp.utility.score} on {sp.utility.data.source}; a crossing with utility more than "
              f"{sp.utility.epsilon:g} below step 0 is degenerate, not a success")
    for line in cost.lines:
        print(f"  {line}")
    for line in _conditions_lines(sp):
        print(f"  {line}")
    built = [d for d in sp.defences if d.build]
    for d in built:
        from trainables.defences import method_class

        b, uses = d.build, method_class(d.build.method).uses
        print(f"  build {d.name}: {b.method} ({b.mode}) from {b.from_}, {b.steps} steps of batch {b.batch_size}, "
              f"lr {b.learning_rate:g}, on its {', '.join(r for r in b.data.given() if r in uses)} data")
        if unread := [r for r in b.data.given() if r not in uses]:
            notes.append(f"defences: {d.name}: {b.method} does not read build.data.{unread[0]}"
                         + (f" (nor {', '.join(unread[1:])})" if unread[1:] else ""))
    if built:
        print("  builds: before the attacks, unless the build cache holds them (`attack-sweep defend` builds "
              "without attacking)")
    for d in sp.defences:
        if a := d.paper_attacker:
            print(f"  paper's attacker against {d.name}: {a.method} ({a.finetune}), lr {a.learning_rate:g}, "
                  f"{a.steps or sp.max_steps} steps of batch {a.batch_size} on {a.dataset_size} rows"
                  + (f" ({a.poison_ratio:g} harmful)" if a.poison_ratio else "") + ": one run beside the search")
    if sp.conditioning:
        c = sp.conditioning
        what = f"the Hessian in {', '.join(c.parameters)}" if c.parameters else f"a {c.head} head on the final features"
        print(f"  diagnostics: κ and RIR at release ({what}; {c.size} rows of {sp.data.attack.source} and of "
              f"{sp.benign_answers.source}), by `attack-sweep diagnose` and after the attacks")
    if sp.g_effect:
        print(f"  diagnostics: G-effect of each attack's gradient at every evaluation point ({sp.g_effect.size} rows "
              "per probe set)")
    for note in [*notes, *cost.notes]:
        print(f"  note: {note}")
    return 0


def _conditions_lines(sp) -> list[str]:
    """What the spec's conditions block will measure, one line each."""
    c, out = sp.conditions, []
    if c is None:
        return ["conditions: resistance only (add conditions: for stability, trainability, generalisation)"]
    if c.stability:
        what = (["the utility proxy"] if sp.utility else []) + \
            ([f"lm-eval {', '.join(c.stability.lm_eval.tasks)}"] if c.stability.lm_eval else [])
        out.append(f"stability: {' and '.join(what)} of each defence at release vs the base, tolerance "
                   f"{c.stability.tolerance:g}")
    if t := c.trainability:
        target = f"loss < {t.target_loss:g}" if t.target_loss is not None else f"match > {t.target_match:g}"
        out.append(f"trainability: a benign fine-tune per defence on {t.data.source} to {target} on "
                   f"{t.eval.source}, at most {t.max_steps} steps; pass within {t.tolerance:g}x the base's budget")
    if g := c.generalisation:
        declared = ", ".join(f"{d.name}: {'/'.join(d.immunised_on)}" for d in sp.defences if d.immunised_on)
        out.append(f"generalisation: out-of-domain vs in-domain worst case ({declared}), pass at >= "
                   f"{g.tolerance:g}x")
    return [f"conditions: {line}" for line in out]


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator import sweep
    from orchestrator.spec.estimate import estimate
    from orchestrator.spec.preflight import check, check_address, check_tracking

    check_tracking(args.tracking_uri)
    check_address(args.address)
    sp = _load(args)
    out_dir, unit = _out_dir(args.out, sp.name), args.unit or sp.search.unit
    if rc := _refuse_out(out_dir):  # before the sweep, not after hours of it
        return rc
    capacity.check_local(capacity.Ask.trial(sp.resources), args.address)
    for note in [*check(sp, checkpoints=not args.skip_checkpoint_checks), *estimate(sp, args.tracking_uri).notes]:
        print(f"note: {note}")
    # the report publish writes on the sweep run is the one printed and kept in out_dir, unless
    # --unit asks for another unit than the search's (the sweep run's report is in the search's)
    same = unit == sp.search.unit
    swept = sweep.run(sp, tracking_uri=args.tracking_uri, address=args.address, storage_path=args.storage_path,
                      report_dir=out_dir if same else None)
    if swept.published is not None and same:
        rc = _show(swept.published.rows, swept.published.text, args.tracking_uri, sp.name, out_dir,
                   fail_on_errors=True, unit=unit)
    else:
        rc = _report(args.tracking_uri, sp.name, args.out, unit, fail_on_errors=True, brief=True)
    if swept.errored:
        print(f"error: {len(swept.errored)} run(s) beside the attacks ended in error: {', '.join(swept.errored)} "
              "(MLflow tag 'error' holds why); rerun the same command to retry them", file=sys.stderr)
        rc = rc or 1
    _mlflow_link(args.tracking_uri, swept.experiment_id)
    _open(args.out, sp.name)
    return rc


def cmd_defend(args: argparse.Namespace) -> int:
    """Build every defence the spec builds (build:), record the builds, attack nothing."""
    from orchestrator import sweep
    from orchestrator.spec.preflight import check, check_address, check_tracking

    check_tracking(args.tracking_uri)
    check_address(args.address)
    sp = _load(args)
    if not any(d.build for d in sp.defences):
        print(f"nothing to build: no defence of {args.spec} has a build: block (docs/defences.md)")
        return 0
    capacity.check_local(capacity.Ask.beside(sp.resources), args.address)
    for note in check(sp, checkpoints=not args.skip_checkpoint_checks):
        print(f"note: {note}")
    _, outcomes = sweep.build(sp, tracking_uri=args.tracking_uri, address=args.address)
    print(f"\n{len(outcomes)} defences built or found; `attack-sweep run {args.spec}` attacks them "
          "(the build cache keeps them)")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Each defence's conditioning at release, recorded beside the sweep's trials, without attacking."""
    from orchestrator import sweep
    from orchestrator.conditions import records
    from orchestrator.report import diagnostics, load, render_text, wrap
    from orchestrator.spec.preflight import check_address, check_tracking

    check_tracking(args.tracking_uri)
    check_address(args.address)
    sp, defaults = _load(args), None
    capacity.check_local(capacity.Ask.beside(sp.resources), args.address)
    if sp.conditioning is None:
        print("conditioning: not in the spec, measured with its defaults (add conditioning: {...} to set them)")
        defaults = _load(args, [("conditioning", {})]).conditioning   # the spec's checks of the block
    sweep.diagnose(sp, tracking_uri=args.tracking_uri, address=args.address, conditioning=defaults)
    found = records.load(args.tracking_uri, sp.name, curves=False).diagnostic
    try:
        rows = load(args.tracking_uri, sp.name, curves=False)
    except LookupError:
        rows = []
    unit = args.unit or sp.search.unit
    table = diagnostics.conditioning_table(rows, found, unit)
    print(f"\n{wrap(diagnostics.CONDITIONING_LEGEND)}\n{render_text(*table)}")
    if missing := [d.name for d in sp.defences if d.name not in found]:
        print(f"error: no diagnostic of {', '.join(missing)}: its run ended in error (MLflow tag 'error' holds why); "
              "rerun the same command to retry", file=sys.stderr)
        return 1
    return 0


def _mlflow_link(tracking_uri: str, experiment_id: str) -> None:
    """Where the trial runs are in the MLflow UI (its runs view: MLflow 3.17 opens a browser new
    to it on its GenAI overview), and for a local store, the command that serves them."""
    from orchestrator.tracking.readers import ui_link

    served = tracking_uri.startswith(("http://", "https://"))
    print(f"trial runs in MLflow: {ui_link(tracking_uri, experiment_id)}"
          + ("" if served else f" (once `mlflow ui --backend-store-uri {tracking_uri}` runs)"))


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.spec.preflight import check_tracking

    check_tracking(args.tracking_uri, creates=False)   # a report reads: a mistyped URI must not start a store
    rc = _report(args.tracking_uri, args.experiment, args.out, args.unit or "steps")
    if rc == 0:
        _open(args.out, args.experiment)
    return rc


def _report(tracking_uri: str, experiment: str, out: str | None, unit: str,
            fail_on_errors: bool = False, brief: bool = False) -> int:
    """Read the records, write the report and print it, or with `brief` its summary (_show)."""
    from orchestrator import report
    from orchestrator.conditions import records as conditions
    from orchestrator.report.folder import replaced

    out_dir = _out_dir(out, experiment)
    if rc := _refuse_out(out_dir):
        return rc
    rows, text = report.load(tracking_uri, experiment), ""
    if rows:
        found = conditions.load(tracking_uri, experiment)
        with replaced(out_dir, report.owned) as staged:  # written beside out_dir, then renamed into place
            text = report.write(rows, experiment, staged, unit=unit, conditions=found)
    return _show(rows, text, tracking_uri, experiment, out_dir, fail_on_errors, unit=unit if brief else None)


def _refuse_out(out_dir: Path) -> int:
    """2 (after one line) when the report's folder is a file, or a folder the report cannot
    replace whole (report/folder.py)."""
    from orchestrator.report import owned
    from orchestrator.report.folder import problem

    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out {out_dir}: is a file; give a folder", file=sys.stderr)
        return 2
    if why := problem(out_dir, owned):
        print(f"error: --out {out_dir}: {why}; the report replaces its folder whole: give it a folder of its own",
              file=sys.stderr)
        return 2
    return 0


def _show(rows: list, text: str, tracking_uri: str, experiment: str, out_dir: Path,
          fail_on_errors: bool = False, unit: str | None = None) -> int:
    """Print the report written into out_dir, or with `unit` (a run's end) its summary in that unit
    and how to print the rest; with fail_on_errors, 1 when trials ended in error (a Ray job whose
    trials crashed must not read SUCCEEDED)."""
    from orchestrator import report

    if not rows:
        print(f"error: --experiment {experiment!r} has no finished trials in {tracking_uri} (yet); check the "
              "name (it is the spec's name) and --tracking-uri", file=sys.stderr)
        return 1
    written = [p.name for p in report.files(out_dir) if p.parent == out_dir and p.name != "report.html"]
    if unit is None:
        print(f"\n{text}")
        print(f"\nwritten to {out_dir}/: {', '.join(written)}, figures/*.png")
    else:
        from orchestrator.conditions import records
        from orchestrator.report.brief import brief

        print("\n" + "\n".join(brief(rows, unit, records.load(tracking_uri, experiment, curves=False))))
        print(f"every table: attack-sweep report --experiment {experiment}"
              + ("" if tracking_uri == DEFAULT_TRACKING_URI else f" --tracking-uri {tracking_uri}")
              + f" (and in {out_dir}/: report.md, the CSV files, figures/)")
    errors = sum(row.count("error") for row in rows)
    if fail_on_errors and errors:
        print(f"error: {errors} trial(s) ended in error (MLflow tag 'error' holds why); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _out_dir(out: str | None, experiment: str) -> Path:
    return Path(out) if out else Path("reports") / safe_name(experiment)


def _open(out: str | None, experiment: str) -> None:
    """The last line: where the report is, to open in a browser."""
    page = _out_dir(out, experiment) / "report.html"
    if page.exists():
        print(f"open the report: {page.resolve().as_uri()}")


def cmd_demo(args: argparse.Namespace) -> int:
    demo_spec = resources.files("orchestrator") / "quickstart.yaml"
    with resources.as_file(demo_spec) as path:
        args.spec, args.skip_checkpoint_checks = str(path), False
        return cmd_run(args)


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlay", action="append", default=[], metavar="FILE",
                   help="YAML mapping of KEY: VALUE overrides, applied before --set (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set max_steps=50 (repeatable)")
    p.add_argument("--skip-checkpoint-checks", action="store_true",
                   help="do not load the defences' configs and tokenizers here (a cluster where only "
                        "the Ray workers can see the models)")


def _load(args: argparse.Namespace, more: list[tuple[str, object]] | None = None):
    from orchestrator import spec as S

    pairs = [pair for path in getattr(args, "overlay", []) for pair in S.overlay(path)]
    return S.load(args.spec, [*pairs, *args.set, *(more or [])])


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attack-sweep", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, spec: bool) -> None:
        if spec:
            sp.add_argument("spec", help="sweep spec (YAML)")
            _overrides(sp)
        sp.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
        sp.add_argument("--out", help="report directory (default reports/NAME)")
        sp.add_argument("--unit", choices=UNITS,
                        help="rank budgets-to-failure in this unit (default: the search's unit; steps)")

    v = sub.add_parser("validate", help="check a spec; print trials, budget and, where recorded, time")
    v.add_argument("spec")
    _overrides(v)
    v.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                   help="read the step times recorded for this sweep here, to estimate its time; read only "
                        f"where it exists, never created (default {DEFAULT_TRACKING_URI})")
    v.set_defaults(fn=cmd_validate)

    for name, fn, spec in (("run", cmd_run, True), ("demo", cmd_demo, False)):
        r = sub.add_parser(name, help="run a sweep and print its report" if spec else
                           "build the toy world and run the quickstart sweep on it")
        common(r, spec)
        if not spec:
            r.set_defaults(set=[], overlay=[])
        r.add_argument("--address", help="Ray cluster: auto, ray://HOST:10001 (default: local)")
        r.add_argument("--storage-path", help="Tune trial state (default .attack-sweep/ray_results)")
        r.set_defaults(fn=fn)

    bd = sub.add_parser("defend", help="build the defences the spec builds (build:), without attacking them")
    common(bd, True)
    bd.add_argument("--address", help="Ray cluster: auto, ray://HOST:10001 (default: local)")
    bd.set_defaults(fn=cmd_defend)

    dg = sub.add_parser("diagnose", help="each defence's conditioning at release (κ, RIR), recorded in MLflow")
    common(dg, True)
    dg.add_argument("--address", help="Ray cluster: auto, ray://HOST:10001 (default: local)")
    dg.set_defaults(fn=cmd_diagnose)

    rep = sub.add_parser("report", help="budget-to-failure report from MLflow")
    rep.add_argument("--experiment", required=True, help="sweep name")
    common(rep, False)
    rep.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        return args.fn(args)
    except SpecError as err:  # already phrased: one line per problem
        print(err, file=sys.stderr)
        return 2
    except LookupError as err:
        if args.debug:
            raise
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _leave(130)
    except Exception as err:  # noqa: BLE001 - whatever it is, the user gets one line
        if args.debug:
            raise
        print(f"error: {one_line(err)} (attack-sweep --debug {args.command} ... shows where)", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, following the
    chain to the root cause where the outer one only wraps it."""
    while err.__cause__ is not None and not str(err).strip():
        err = err.__cause__
    text = (str(err).strip().splitlines() or [""])[0].strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _leave(code: int) -> NoReturn:
    """Exit now, after the Ctrl-C's one line. The sweep closed its MLflow records before the
    interrupt reached here, but threads Ray and Tune leave behind after a Ctrl-C can hang the
    interpreter's exit: give ray.shutdown a bounded chance, then leave without waiting for them.
    Another Ctrl-C meanwhile is ignored, and a third leaves at once (sigint.leaving)."""
    import threading

    sigint.leaving(code)
    try:
        print("interrupted: finished trials are in MLflow; rerun the same command to resume", file=sys.stderr)
        sigint.flush()
        ray = sys.modules.get("ray")  # not imported: no Ray of ours to stop
        if ray is not None and ray.is_initialized():
            stop = threading.Thread(target=ray.shutdown, daemon=True)
            stop.start()
            stop.join(timeout=15)
    finally:
        os._exit(code)


def entry() -> None:
    """The console script: main(), then the exit a normal one makes (every atexit handler: Ray's
    shutdown, MLflow's, temporary folders), less the interpreter's teardown after it, which
    spends seconds freeing what torch, transformers and Ray loaded (2.7 s after a one-trial
    sweep on 2 cores) and can do nothing a command needs: by then only the main thread runs.
    A Ctrl-C while the handlers run is ignored (sigint.leaving)."""
    try:
        code = main()
        sigint.leaving(code)
    except KeyboardInterrupt:  # one that came after main's own handling of it began
        _leave(130)
    atexit._run_exitfuncs()
    sigint.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
