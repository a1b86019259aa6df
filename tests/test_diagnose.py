"""The diagnostics end to end on the toy world, through the CLI, a real local Ray and a real MLflow
store: `attack-sweep diagnose` records each defence's conditioning once (a rerun measures nothing,
a changed setting measures again), `run` records the attacks' G-effect curves, and the report
shows κ, RIR beside the worst case, the G-effect table and figure."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import sweep_dict
from mlflow.tracking import MlflowClient

from orchestrator import cli, sweep
from orchestrator import spec as S
from orchestrator.conditions import records
from trainables.names import G_EFFECT_SECONDS, G_TOTAL, Kind, Metric, Tag, g_effect


def diagnostic_runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.DIAGNOSTIC}'")


def spec_file(tmp_path, world, name: str, defences=("base", "rescaled"), **over) -> str:
    raw = sweep_dict(world, name, defences=defences, max_steps=10, eval_every=5,
                     utility={"data": {"source": str(world / "benign_heldout.jsonl")}},
                     space={"dataset_size": 32, "learning_rate": {"grid": [3e-3]}}, **over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def swept(world, ray_local, tmp_path_factory):
    """One sweep with both diagnostics: conditioning at release and the G-effect in every trial."""
    tmp = tmp_path_factory.mktemp("diagnosed")
    uri = f"sqlite:///{tmp}/mlflow.db"
    spec = spec_file(tmp, world, "diagnosed", conditioning={"size": 48}, g_effect={"size": 8})
    (tmp / "report").mkdir()
    (tmp / "report" / "notes.txt").write_text("the user's own file, never uploaded")
    rc = cli.main(["run", spec, "--tracking-uri", uri, "--out", str(tmp / "report")])
    assert rc == 0
    return uri, tmp


def test_run_writes_its_report_once_the_same_in_its_folder_and_on_the_sweep_run(swept):
    uri, tmp = swept
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("diagnosed")
    (sweep_run,) = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.SWEEP}'")
    run_id = sweep_run.info.run_id
    logged = {a.path for a in client.list_artifacts(run_id, "report") if not a.is_dir}
    logged |= {a.path for a in client.list_artifacts(run_id, "report/figures")}
    local = {str(p.relative_to(tmp)) for p in (tmp / "report").rglob("*") if p.is_file()}
    assert logged == local - {"report/notes.txt"}      # what the report wrote, nothing else the folder holds
    for name in ("report/report.html", "report/report.csv", "report/figures/g_effect.png"):
        assert (tmp / name).read_bytes() == Path(client.download_artifacts(run_id, name)).read_bytes()


def test_run_records_the_g_effect_at_every_evaluation_point(swept):
    uri, _ = swept
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("diagnosed")
    trials = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.TRIAL}'")
    assert len(trials) == 2
    for run in trials:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "harmfulness"))
        for risk in ("benign", "harmful"):
            curve = client.get_metric_history(run.info.run_id, g_effect(risk, G_TOTAL))
            assert sorted(m.step for m in curve) == steps and all(math.isfinite(m.value) for m in curve)
            blocks = [k for k in run.data.metrics if k.startswith(g_effect(risk, "")) and not k.endswith(G_TOTAL)]
            assert {"layer00", "layer01", "lm_head"} <= {b.split(".", 1)[1] for b in blocks}
            # the blocks add up to the total at the final point
            assert sum(run.data.metrics[b] for b in blocks) == pytest.approx(
                run.data.metrics[g_effect(risk, G_TOTAL)], rel=1e-6, abs=1e-9)
        assert run.data.metrics[G_EFFECT_SECONDS] > 0


def dense_spectrum(world, spec_path: str, defence: str, task: str, size: int) -> np.ndarray:
    """The least-squares head's Hessian ΦᵀΦ/n by hand: Φ the final hidden states (what the output head
    reads, here from output_hidden_states) at every position that predicts a response token of the
    task's first `size` rows; its eigenvalues by a dense solver."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainables import data as D
    from trainables.checkpoint import load_tokenizer
    from trainables.config import Checkpoint

    spec = S.load(spec_path)
    d = next(x for x in spec.defences if x.name == defence)
    src = spec.data.attack if task == "harmful" else spec.benign_answers
    tokenizer = load_tokenizer(Checkpoint.model_validate(d.checkpoint()))
    batch = D.collate(D.tokenize_rows(tokenizer, D.load_rows(src)[:size], src, spec.data), tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(world / defence).eval()
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[-1]
    phi = hidden[:, :-1][batch["labels"][:, 1:] != -100].double().numpy()
    return np.linalg.eigvalsh(phi.T @ phi / len(phi))


def test_run_records_each_defences_conditioning_and_the_report_shows_it(swept, world):
    uri, tmp = swept
    runs = {r.data.tags[Tag.DEFENCE]: r for r in diagnostic_runs(uri, "diagnosed")}
    assert set(runs) == {"base", "rescaled"}
    kappa = {}
    for defence, run in runs.items():
        assert run.data.tags[Tag.STATUS] == "measured" and run.data.params["head"] == "least_squares"
        for task in ("harmful", "benign"):
            assert run.data.tags[f"{Tag.VERDICT}.{task}"] == "ok"
            m = {q: run.data.metrics[Metric.conditioning(q, task)] for q in Metric.CONDITIONING}
            w = dense_spectrum(world, str(tmp / "diagnosed.yaml"), defence, task, 48)
            assert (m["dim"], m["lambda_max"], m["lambda_min"]) == (64, pytest.approx(w[-1], rel=1e-4),
                                                                   pytest.approx(w[0], rel=1e-4))
            kappa[defence, task] = w[-1] / w[0]
            assert m["kappa"] == pytest.approx(kappa[defence, task], rel=1e-3)
            assert m["kappa_low"] <= kappa[defence, task] <= m["kappa_high"] and m["matvecs"] > 0
    # RIR from the dense spectra: rescaling every weight by one factor moves both tasks' κ alike
    rir = (kappa["rescaled", "harmful"] / kappa["base", "harmful"]) / (kappa["rescaled", "benign"] /
                                                                       kappa["base", "benign"])
    with open(tmp / "report" / "conditioning.csv") as fh:
        rows = {r["defence"]: r for r in csv.DictReader(fh)}
    assert float(rows["rescaled"]["rir"]) == pytest.approx(rir, rel=2e-3) and rir == pytest.approx(1.0, rel=1e-2)
    assert float(rows["base"]["rir"]) == 1.0
    md = (tmp / "report" / "report.md").read_text()
    assert "## Conditioning at release" in md and "RIR ≈ 1 with λmax moved" in md
    assert "## G-effect of the attacks' gradients" in md
    assert (tmp / "report" / "figures" / "g_effect.png").stat().st_size > 10_000
    # the sweep run shows the same at a glance: RIR and κ as metrics, a line of its description
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("diagnosed")
    (sweep_run,) = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.SWEEP}'")
    assert sweep_run.data.metrics["rir.rescaled"] == pytest.approx(1.0, rel=1e-3)
    assert sweep_run.data.metrics["kappa_harmful.base"] == pytest.approx(
        runs["base"].data.metrics[Metric.conditioning("kappa", "harmful")])
    assert "**Conditioning** (RIR vs the base" in sweep_run.data.tags[Tag.NOTE]
    html = (tmp / "report" / "report.html").read_text()
    assert "G-effect of the attacks&#x27; gradients against step" in html and "κ harmful" in html


def test_diagnose_measures_once_and_again_when_its_settings_change(world, ray_local, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_file(tmp_path, world, "diagnose-only", defences=("base", "noised"))
    assert cli.main(["diagnose", spec, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "measured with its defaults" in out and "κ harmful" in out
    assert len(diagnostic_runs(uri, "diagnose-only")) == 2
    # under the sweep run `run` of the same spec records: the spec's digest, not one with the block
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("diagnose-only")
    (sweep_run,) = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.SWEEP}'")
    assert sweep_run.data.tags[Tag.SPEC_DIGEST] == sweep.spec_digest(S.load(spec))
    assert cli.main(["diagnose", spec, "--tracking-uri", uri]) == 0
    assert "already recorded" in capsys.readouterr().out
    assert len(diagnostic_runs(uri, "diagnose-only")) == 2            # nothing measured twice
    assert cli.main(["diagnose", spec, "--tracking-uri", uri, "--set", "conditioning.size=16"]) == 0
    runs = diagnostic_runs(uri, "diagnose-only")
    assert len(runs) == 4 and {r.data.params["size"] for r in runs} == {"16", "64"}
    latest = records.load(uri, "diagnose-only").diagnostic
    assert {d.params["size"] for d in latest.values()} == {"16"}      # the latest settings are reported


def test_diagnose_that_cannot_measure_says_why_and_fails(world, ray_local, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_file(tmp_path, world, "diagnose-bad", conditioning={"parameters": ["no.such.*"]})
    assert cli.main(["diagnose", spec, "--tracking-uri", uri]) == 1
    captured = capsys.readouterr()
    assert "conditioning.parameters: no parameter name matches" in captured.out
    assert "error" in captured.err and "rerun" in captured.err
    assert {r.data.tags[Tag.STATUS] for r in diagnostic_runs(uri, "diagnose-bad")} == {"error"}


def test_run_fails_when_a_run_beside_the_attacks_ended_in_error(world, ray_local, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_file(tmp_path, world, "run-bad-diagnostic", defences=("base",),
                     conditioning={"parameters": ["no.such.*"]})
    assert cli.main(["run", spec, "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 1
    err = capsys.readouterr().err
    assert "1 run(s) beside the attacks ended in error: diagnostic · base" in err and "rerun" in err
    assert (tmp_path / "report" / "report.html").exists()   # the attacks' report is still written


@pytest.mark.parametrize("over, message", [
    ({"conditioning": {}, "utility": None, "data": None}, "conditioning: the benign task needs benign prompts"),
    ({"g_effect": {}, "resources": {"workers": 2}}, "g_effect: the probe takes whole gradients"),
    ({"conditioning": {"head": "svd"}}, "conditioning.head"),
])
def test_bad_diagnostic_settings_are_one_line_errors(world, tmp_path, capsys, over, message):
    raw = sweep_dict(world, "bad", **{k: v for k, v in over.items() if v is not None})
    if over.get("data", 0) is None:  # no benign split at all
        raw["data"] = {k: v for k, v in raw["data"].items() if k != "benign"}
    raw.pop("utility", None) if over.get("utility", 0) is None else None
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["validate", str(path), "--skip-checkpoint-checks"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
