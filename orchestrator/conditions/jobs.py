"""The runs beside the attacks: each defence (the base included) measured at release (stability),
fine-tuned on a benign task (trainability), and diagnosed (its conditioning: κ of the harmful and
the benign task's Hessian, trainables/conditioning.py), as Ray tasks, recorded in MLflow as runs of
kind `release`, `benign` and `diagnostic` under the sweep run."""

from __future__ import annotations

import json
import math
import sys
import traceback
from collections.abc import Callable
from typing import Any

from orchestrator.capacity import Ask, check_cluster
from orchestrator.cluster import WORKER_RETRIES, last_line
from orchestrator.spec.model import Defence, SweepSpec
from orchestrator.spec.space import digest
from orchestrator.tracking.writer import Tracker
from trainables.coherence import Coherence
from trainables.conditioning import TASKS
from trainables.config import AttackConfig, Data, EvaluatorConfig
from trainables.names import BUDGET_UNITS, MEASURED, SUCCESS, TARGET_OUTCOME, Kind, Metric, Tag


def settings(spec: SweepSpec) -> dict[str, Any]:
    """What the report judges the conditions by (the sweep run's `conditions` tag): which were asked
    and their tolerances, the budget unit, and each defence's immunised_on. Paths stay out: a tag
    holds a few thousand characters, and the verdicts do not need them."""
    c, asked = spec.conditions, {}
    if c and c.stability:
        lm = c.stability.lm_eval
        asked["stability"] = {"tolerance": c.stability.tolerance,
                              "lm_eval": {"tasks": lm.tasks, "tolerance": lm.tolerance} if lm else None}
    if c and c.trainability:
        asked["trainability"] = {"tolerance": c.trainability.tolerance, "unit": c.trainability.unit}
    if c and c.generalisation:
        asked["generalisation"] = {"tolerance": c.generalisation.tolerance}
    return {"conditions": asked, "unit": spec.search.unit,
            "immunised_on": {d.name: d.immunised_on for d in spec.defences if d.immunised_on is not None}}


def benign_config(spec: SweepSpec, defence: Defence) -> AttackConfig:
    """The benign fine-tune of `defence`: the attack loop on the trainability task. No utility
    bound: fine-tuning on a new task may cost some old capability (that is ordinary forgetting,
    not what trainability asks); the target alone says whether the task was learned. No coherence
    gate: it gates harmfulness, and a task's reference answer may be a bare number (a fragment)."""
    t = spec.conditions.trainability
    if t.target_loss is not None:
        evaluator = EvaluatorConfig(name="nll", options={"max_length": spec.data.max_length})
        phi = math.exp(-t.target_loss)
    else:
        evaluator = EvaluatorConfig(name="answer_match", options={"max_new_tokens": t.max_new_tokens})
        phi = t.target_match
    one_process = spec.resources.workers == 1
    return AttackConfig(
        checkpoint=defence.checkpoint(), attacker=t.attacker, evaluator=evaluator, phi=phi,
        data=Data(attack=t.data, eval=t.eval, eval_size=t.eval_size,
                  **spec.data.model_dump(include={"chat_template", "prompt_format", "max_length", "system_prompt"})),
        eval_every=t.eval_every, max_steps=t.max_steps, device=spec.device,
        coherence=Coherence(enabled=False),   # a benign task's answer may be a number: no harm to gate
        refine=spec.refine if one_process and spec.deepspeed is None else 0,
        deepspeed=spec.deepspeed if one_process else None)


def release_config(spec: SweepSpec, defence: Defence) -> dict[str, Any]:
    s = spec.conditions.stability
    return {"checkpoint": defence.checkpoint(), "data": spec.data.model_dump(mode="json"),
            "utility": spec.utility.model_dump(mode="json") if spec.utility else None,
            "lm_eval": s.lm_eval.model_dump(mode="json") if s.lm_eval else None, "device": spec.device}


def diagnostic_config(spec: SweepSpec, defence: Defence) -> dict[str, Any]:
    """What decides a defence's conditioning diagnostic (trainables/conditioning.py)."""
    return {"checkpoint": defence.checkpoint(), "data": spec.data.model_dump(mode="json"),
            "benign": spec.benign_answers.model_dump(mode="json"),
            "conditioning": spec.conditioning.model_dump(mode="json"), "device": spec.device}


def paper_config(spec: SweepSpec, defence: Defence) -> AttackConfig:
    """The attack of `defence` by its paper's attacker: a trial of this sweep with that attacker."""
    from orchestrator.sweep.loop import attack_config

    return attack_config(spec, {"defence": defence.name, **defence.paper_attacker.model_dump(mode="json")})


KINDS = (Kind.RELEASE, Kind.BENIGN, Kind.DIAGNOSTIC, Kind.PAPER)


def jobs(spec: SweepSpec, kinds: tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
    """Every run beside the attacks the spec asks for, of `kinds`: (kind, defence, key, payload)."""
    c = spec.conditions
    out = []
    for d in spec.defences:
        if spec.conditioning and Kind.DIAGNOSTIC in kinds:
            payload = diagnostic_config(spec, d)
            out.append({"kind": Kind.DIAGNOSTIC, "defence": d, "payload": payload,
                        "key": digest({"kind": Kind.DIAGNOSTIC, **payload})})
        if c and c.stability and Kind.RELEASE in kinds:
            payload = release_config(spec, d)
            out.append({"kind": Kind.RELEASE, "defence": d, "payload": payload,
                        "key": digest({"kind": Kind.RELEASE, **payload})})
        if d.paper_attacker is not None and Kind.PAPER in kinds:
            cfg = paper_config(spec, d)
            out.append({"kind": Kind.PAPER, "defence": d, "payload": cfg.model_dump(mode="json"),
                        "key": digest({"kind": Kind.PAPER, **cfg.model_dump(mode="json")})})
        if c and c.trainability and Kind.BENIGN in kinds:
            cfg = benign_config(spec, d)
            out.append({"kind": Kind.BENIGN, "defence": d, "payload": cfg.model_dump(mode="json"),
                        "key": digest({"kind": Kind.BENIGN, **cfg.model_dump(mode="json")})})
    return out


def _measure(kind: str, payload: dict[str, Any], threads: int) -> dict[str, Any]:
    """One condition run, in a Ray worker: {"metrics": ...} or {"points": [...], "status": ...},
    or {"error": last line, "traceback": ...}."""
    import torch

    torch.set_num_threads(threads)
    try:
        if kind == Kind.DIAGNOSTIC:
            from trainables import conditioning
            from trainables.config import Checkpoint, DataSource

            metrics, tags = conditioning.records(conditioning.measure(
                Checkpoint.model_validate(payload["checkpoint"]), Data.model_validate(payload["data"]),
                DataSource.model_validate(payload["benign"]),
                conditioning.Conditioning.model_validate(payload["conditioning"]), payload["device"]))
            return {"metrics": metrics, "tags": tags}
        if kind == Kind.RELEASE:
            from trainables.capability import LmEval
            from trainables.config import Checkpoint, Utility
            from trainables.release import measure

            return {"metrics": measure(
                Checkpoint.model_validate(payload["checkpoint"]), Data.model_validate(payload["data"]),
                Utility.model_validate(payload["utility"]) if payload["utility"] else None,
                LmEval.model_validate(payload["lm_eval"]) if payload["lm_eval"] else None, payload["device"])}
        from trainables import run_attack

        points: list[dict[str, Any]] = []
        result = run_attack(AttackConfig.model_validate(payload), on_eval=lambda p: points.append(p.as_dict()))
        return {"points": points, "status": result.status}
    except Exception as err:  # noqa: BLE001 - whatever it raised is this run's error, recorded
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        return {"error": last_line(text) or type(err).__name__, "traceback": text[-20_000:]}


def run(spec: SweepSpec, tracker: Tracker, echo: Callable[[str], None], start_ray: Callable[[], None],
        kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Measure what is missing of `kinds`, one Ray task per run, as resources allow; record each as
    it ends; return the names of the runs that ended in error ('benign · rescaled'). `start_ray()`
    connects to Ray (only called when something is left to measure)."""
    if spec.conditions:
        tracker.set_sweep_tag(Tag.CONDITIONS, json.dumps(settings(spec), sort_keys=True))
    asked = jobs(spec, kinds)
    head = "diagnostics" if all(j["kind"] == Kind.DIAGNOSTIC for j in asked) else \
        "paper attackers" if all(j["kind"] == Kind.PAPER for j in asked) else "conditions"
    done = {kind: tracker.completed_keys(kind) for kind in {j["kind"] for j in asked}}
    todo = [j for j in asked if j["key"] not in done[j["kind"]]]
    if asked and not todo:
        echo(f"{head}: every {' and '.join(k for k in KINDS if any(j['kind'] == k for j in asked))} run already "
             "recorded")
    if not todo:
        return []
    import ray

    start_ray()
    r = spec.resources
    check_cluster(Ask.beside(r), echo)  # a task no node can hold would wait for ever
    task = ray.remote(_measure).options(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=WORKER_RETRIES)
    echo(f"{head}: {len(todo)} runs ({', '.join(sorted({j['kind'] for j in todo}))}) on "
         f"{len({j['defence'].name for j in todo})} defences")
    pending, errored = {}, []
    for j in todo:
        d = j["defence"]
        run_id = tracker.start_run(j["kind"], j["key"], d.name, d.base, f"{j['kind']} · {d.name}",
                                   {"defence": d.name, **_params(j)})
        pending[task.remote(j["kind"], j["payload"], max(1, int(r.cpu)))] = (j, run_id)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            j, run_id = pending.pop(ready[0])
            out = ray.get(ready[0])
            echo(f"{head}: {_record(tracker, j, run_id, out, spec.search.unit)}")
            if "error" in out:
                errored.append(f"{j['kind']} · {j['defence'].name}")
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return errored


def _params(j: dict[str, Any]) -> dict[str, Any]:
    p = j["payload"]
    if j["kind"] == Kind.DIAGNOSTIC:
        c = p["conditioning"]
        return {"head": c["head"], "parameters": ",".join(c["parameters"] or []) or None, "size": c["size"],
                "rtol": c["rtol"], "harmful_task": p["data"]["attack"]["source"],
                "benign_task": p["benign"]["source"]}
    if j["kind"] == Kind.RELEASE:
        out = {"utility_score": (p["utility"] or {}).get("score")}
        if p["lm_eval"]:
            out.update(lm_eval_tasks=",".join(p["lm_eval"]["tasks"]), lm_eval_limit=p["lm_eval"]["limit"])
        return {k: v for k, v in out.items() if v is not None}
    a = p["attacker"]
    if j["kind"] == Kind.PAPER:
        return {k: a[k] for k in ("method", "learning_rate", "optimizer", "finetune", "dataset_size", "batch_size",
                                  "lr_schedule", "steps") if k in a}
    return {"task": p["data"]["attack"]["source"], "target_evaluator": p["evaluator"]["name"], "phi": p["phi"],
            "max_steps": p["max_steps"], "eval_every": p["eval_every"],
            **{k: a[k] for k in ("learning_rate", "optimizer", "finetune", "dataset_size", "batch_size")}}


def _record(tracker: Tracker, j: dict[str, Any], run_id: str, out: dict[str, Any], unit: str) -> str:
    """Write one finished run; return its line for the console."""
    name = f"{j['kind']} · {j['defence'].name}"
    if "error" in out:
        tracker.log_error(run_id, out["traceback"])
        tracker.finish_run(run_id, "error", {}, out["error"])
        return f"{name}: error: {out['error']} (rerun the sweep to retry it)"
    if j["kind"] == Kind.DIAGNOSTIC:
        tracker.finish_run(run_id, MEASURED, out["metrics"], tags=out["tags"])
        verdicts = {task: out["tags"][f"{Tag.VERDICT}.{task}"] for task in TASKS}
        return f"{name}: " + ", ".join(f"κ {task} {out['metrics'][Metric.conditioning('kappa', task)]:.3g}"
                                       if v == "ok" else f"{task} {v}" for task, v in verdicts.items())
    if j["kind"] == Kind.RELEASE:
        tracker.finish_run(run_id, MEASURED, out["metrics"])
        return f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in out["metrics"].items())
    if j["kind"] == Kind.PAPER:
        return _record_paper(tracker, name, run_id, out, unit)
    for point in out["points"]:
        tracker.log_point(run_id, _task_curves(point))
    last, status = out["points"][-1], TARGET_OUTCOME[out["status"]]
    metrics = {Metric.spent(u): max(float(p[f]) for p in out["points"]) for u, f in BUDGET_UNITS.items()}
    if out["status"] in SUCCESS:
        metrics.update({Metric.btt(u): float(last[f]) for u, f in BUDGET_UNITS.items()})
    tracker.finish_run(run_id, status, metrics)
    where = f"at {last[BUDGET_UNITS[unit]]:g} {unit}" if out["status"] in SUCCESS else \
        f"after {metrics[Metric.spent(unit)]:g} {unit}"
    return f"{name}: target {status.replace('_', ' ')} {where}"


def _task_curves(point: dict[str, Any]) -> dict[str, Any]:
    """An evaluation of a benign run, named as what it is: f is the task's score (task_score);
    harm-specific figures (its interval, per-evaluator copies, samples) are left out."""
    keep = {k: v for k, v in point.items() if "." not in k and not k.startswith("harmfulness")}
    return {**keep, Metric.TASK_SCORE: point["harmfulness"]}


def _record_paper(tracker: Tracker, name: str, run_id: str, out: dict[str, Any], unit: str) -> str:
    """A paper attacker's run: its curves as a trial's, its status, its budget-to-failure where it broke
    the defence and what it spent."""
    for point in out["points"]:
        tracker.log_point(run_id, point)
    last, status = out["points"][-1], out["status"]
    metrics = {Metric.spent(u): max(float(p[f]) for p in out["points"]) for u, f in BUDGET_UNITS.items()}
    if status in SUCCESS:
        metrics.update({Metric.btf(u): float(last[f]) for u, f in BUDGET_UNITS.items()})
    tracker.finish_run(run_id, status, metrics)
    where = f"broke it at {last[BUDGET_UNITS[unit]]:g} {unit}" if status in SUCCESS else \
        f"{status} after {metrics[Metric.spent(unit)]:g} {unit}"
    return f"{name}: {where}"
