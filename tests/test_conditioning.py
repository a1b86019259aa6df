"""The condition-number diagnostic (trainables/hessian.py, trainables/conditioning.py) against
dense eigendecompositions: the Lanczos ends match torch.linalg.eigvalsh of the full Hessian, on
explicit matrices, on a linear probe like Zheng et al.'s, and on the toy world's heads; κ is
withheld (never divided) where λmin is 0, negative or unresolved."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables import data as D
from trainables.checkpoint import load_model, load_tokenizer
from trainables.conditioning import Conditioning, Kappa, _head_loss, _model_loss, features, measure, rir
from trainables.config import Checkpoint, Data, DataSource
from trainables.hessian import extremes, hvp_of


def dense_ends(h: np.ndarray) -> tuple[float, float]:
    w = np.linalg.eigvalsh(h)
    return float(w[-1]), float(w[0])


def assert_matches(ends, h: np.ndarray) -> None:
    """Each end lies within its own error bound (and a hair of float64) of the dense answer."""
    top, bottom = dense_ends(h)
    scale = max(abs(top), abs(bottom))
    assert abs(ends.top.value - top) <= ends.top.error + 1e-9 * scale, (ends.top, top)
    assert abs(ends.bottom.value - bottom) <= ends.bottom.error + 1e-9 * scale, (ends.bottom, bottom)


def random_psd(n: int, cond: float, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * np.geomspace(1.0, 1.0 / cond, n)) @ q.T


@pytest.mark.parametrize("n", [1, 2, 3, 40, 600])
def test_lanczos_ends_match_the_dense_spectrum_of_a_psd_matrix(n):
    h = random_psd(n, cond=1e3, seed=n)
    ends = extremes(lambda v: h @ v, n)
    assert_matches(ends, h)
    assert ends.converged and Kappa.of(ends).verdict == "ok"
    kappa = Kappa.of(ends)
    true = np.linalg.cond(h) if n > 1 else 1.0
    assert kappa.low <= true * (1 + 1e-9) and kappa.high >= true * (1 - 1e-9)
    assert kappa.value == pytest.approx(true, rel=1e-3)


def test_an_end_that_runs_out_of_products_is_unconverged_and_gives_no_kappa():
    """κ = 100 exactly (eigenvalues 1 ... 0.01), but 70 products per end cannot pin λmin = 0.01 in
    dimension 600: the residual |Hv - λv| of the end found exceeds rtol·λ, so the end is reported
    unconverged, its error still bounding the truth, and κ is withheld rather than read off it."""
    n = 600
    h = random_psd(n, cond=100.0, seed=n)
    ends = extremes(lambda v: h @ v, n, max_matvecs=70)
    top, bottom = dense_ends(h)
    assert (top, bottom) == (pytest.approx(1.0), pytest.approx(0.01))
    assert ends.top.converged and ends.top.value == pytest.approx(1.0, rel=1e-4)
    assert not ends.bottom.converged and not ends.converged
    assert ends.bottom.error > 1e-4 * ends.bottom.value                    # why: the residual is too large
    assert abs(ends.bottom.value - bottom) <= ends.bottom.error            # and still bounds the distance
    assert abs(ends.bottom.value - bottom) > 1e-4 * bottom                 # premise: the value is off
    k = Kappa.of(ends)
    assert k.verdict == "unconverged" and math.isnan(k.value) and "did not reach rtol" in k.why
    # the same operator with the default budget converges to κ = 100
    assert Kappa.of(extremes(lambda v: h @ v, n)).value == pytest.approx(100.0, rel=1e-3)


def test_an_indefinite_matrix_reports_both_ends_and_no_kappa():
    n = 200
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((n, n)))
    h = (q * np.linspace(-2.0, 3.0, n)) @ q.T
    ends = extremes(lambda v: h @ v, n)
    assert_matches(ends, h)
    k = Kappa.of(ends)
    assert k.verdict == "indefinite" and math.isnan(k.value) and "not PSD" in k.why
    assert ends.bottom.value == pytest.approx(-2.0, rel=1e-4) and ends.top.value == pytest.approx(3.0, rel=1e-4)


def test_a_singular_matrix_gives_a_lower_bound_never_a_division_by_zero():
    n, rank = 120, 60   # e.g. fewer feature rows than features
    a = np.random.default_rng(2).standard_normal((n, rank))
    h = a @ a.T / rank
    ends = extremes(lambda v: h @ v, n)
    k = Kappa.of(ends)
    assert k.verdict == "singular" and math.isfinite(k.value) and "not resolved from 0" in k.why
    assert k.value >= 1e6  # a lower bound: lambda_max / (|lambda_min| + its error), both tiny


def test_a_vanishing_hessian_like_lora_a_at_initialisation_is_zero_not_infinite():
    """Loss |B a|^2 in a, with B = 0 (LoRA's B at init): the Hessian in a is exactly 0."""
    b = torch.zeros(4, 30, dtype=torch.float64)
    ends = extremes(hvp_of(lambda a: (b @ a).pow(2).sum(), torch.randn(30, dtype=torch.float64)), 30)
    assert ends.top.value == 0 and ends.bottom.value == 0
    k = Kappa.of(ends)
    assert k.verdict == "zero" and math.isnan(k.value)


def test_hvp_of_is_the_hessian_times_the_vector():
    h = torch.tensor(random_psd(30, 10.0, seed=3))
    x0 = torch.randn(30, dtype=torch.float64)
    hvp = hvp_of(lambda x: 0.5 * x @ h @ x + x.pow(3).sum(), x0)   # Hessian h + diag(6 x0)
    v = np.random.default_rng(4).standard_normal(30)
    want = (h + torch.diag(6 * x0)).numpy() @ v
    np.testing.assert_allclose(hvp(v), want, rtol=1e-12, atol=1e-12)


def test_a_linear_probe_as_in_zheng_et_al_kappa_and_rir_in_closed_form():
    """Features X·θ of a linear feature extractor θ: the probe's Hessian is θᵀXᵀXθ/n and κ its
    condition number. An immuniser that stretches the harmful features' directions raises κ_H, a
    uniform rescaling c·θ changes no κ (RIR exactly 1) while λmax moves c² fold."""
    rng = np.random.default_rng(5)
    d, n = 16, 400
    xh, xp = rng.standard_normal((n, d)), rng.standard_normal((n, d)) @ np.diag(np.linspace(1, 2, d))

    def kappa(x: np.ndarray, theta: np.ndarray) -> tuple[Kappa, float]:
        phi = torch.tensor(x @ theta)
        ends = extremes(hvp_of(lambda w: 0.5 * (phi @ w).pow(2).mean(), torch.zeros(d, dtype=torch.float64)), d)
        assert_matches(ends, (x @ theta).T @ (x @ theta) / n)
        return Kappa.of(ends), ends.top.value

    ident = np.eye(d)
    immunised = np.diag(np.geomspace(1.0, 0.05, d))  # squeezes directions: harmful and benign alike here
    k = {(task, name): kappa(x, th)[0].value for task, x in (("harmful", xh), ("benign", xp))
         for name, th in (("base", ident), ("imm", immunised), ("scaled", 30 * ident))}
    for task, x in (("harmful", xh), ("benign", xp)):
        assert k[task, "base"] == pytest.approx(np.linalg.cond(x.T @ x), rel=1e-3)
        assert k[task, "imm"] == pytest.approx(np.linalg.cond(immunised @ x.T @ x @ immunised), rel=1e-3)
    by = {name: {task: k[task, name] for task in ("harmful", "benign")} for name in ("base", "imm", "scaled")}
    assert rir(by["scaled"], by["base"]) == pytest.approx(1.0, rel=1e-3)
    want = (k["harmful", "imm"] / k["harmful", "base"]) / (k["benign", "imm"] / k["benign", "base"])
    assert rir(by["imm"], by["base"]) == pytest.approx(want, rel=1e-12)
    assert kappa(xh, 30 * ident)[1] == pytest.approx(900 * kappa(xh, ident)[1], rel=1e-9)
    assert math.isnan(rir({"harmful": 3.0}, by["base"]))   # a missing κ: no ratio


# --- the toy world's checkpoints -----------------------------------------------------------------


def toy_batch(world, split: str, size: int):
    tokenizer = load_tokenizer(Checkpoint(model=str(world / "base")))
    data = Data(attack=DataSource(source=str(world / "attack.jsonl")),
                eval=DataSource(source=str(world / "eval.jsonl")))
    src = DataSource(source=str(world / split))
    rows = D.load_rows(src)[:size]
    return D.collate(D.tokenize_rows(tokenizer, rows, src, data), tokenizer.pad_token_id), data


def test_the_least_squares_head_is_the_feature_covariance_of_the_toy_model(world):
    model = load_model(Checkpoint(model=str(world / "base")), torch.device("cpu")).eval()
    batch, _ = toy_batch(world, "attack.jsonl", 24)
    phi, y = features(model, batch)
    assert phi.shape[0] == int((batch["labels"][:, 1:] != -100).sum()) == len(y)
    # the features are what the head reads: the head on them gives the model's logits
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(phi.float() @ model.lm_head.weight.T, logits[keep], rtol=1e-4, atol=1e-4)
    loss, x0, _ = _head_loss(model, batch, "least_squares")
    ends = extremes(hvp_of(loss, x0), x0.numel())
    assert_matches(ends, (phi.T @ phi / len(phi)).numpy())


def test_the_cross_entropy_head_matches_the_full_hessian_on_the_sum_zero_subspace(world):
    model = load_model(Checkpoint(model=str(world / "noised")), torch.device("cpu")).eval()
    batch, _ = toy_batch(world, "benign_heldout.jsonl", 6)
    loss, x0, _ = _head_loss(model, batch, "cross_entropy")
    assert 1000 < x0.numel() < 3000   # (labels - 1) x 64 features
    ends = extremes(hvp_of(loss, x0), x0.numel(), max_matvecs=6000)
    assert_matches(ends, torch.func.hessian(loss)(x0).numpy())
    # the same spectrum as the Hessian in the head's rows themselves, less its d null directions
    # (one vector added to every row changes no probability)
    phi, y = features(model, batch)
    labels, y = torch.unique(y, return_inverse=True)
    rows = model.lm_head.weight.detach()[labels].double()
    k, d = rows.shape
    in_rows = torch.func.hessian(lambda w: torch.nn.functional.cross_entropy(phi @ w.reshape(k, d).T, y))(
        rows.reshape(-1)).numpy()
    w = np.linalg.eigvalsh(in_rows)
    assert np.all(np.abs(w[:d]) < 1e-9 * w[-1]) and w[d] > 1e-7 * w[-1]
    assert ends.top.value == pytest.approx(w[-1], rel=1e-9)
    assert abs(ends.bottom.value - w[d]) <= ends.bottom.error + 1e-9 * w[-1]


def test_a_parameter_subset_of_the_model_matches_its_full_hessian_and_is_not_psd(world):
    model = load_model(Checkpoint(model=str(world / "base")), torch.device("cpu")).eval()
    batch, _ = toy_batch(world, "attack.jsonl", 8)
    loss, x0, _ = _model_loss(model, batch, ["model.norm.weight", "model.layers.1.post_attention_layernorm.*"])
    assert x0.numel() == 128
    full = torch.func.hessian(loss)(x0).numpy()
    ends = extremes(hvp_of(loss, x0), x0.numel())
    assert_matches(ends, full)
    with pytest.raises(ValueError, match="conditioning.parameters: no parameter name matches"):
        _model_loss(model, batch, ["nothing.*"])


def test_a_hessian_too_large_for_lanczos_is_refused_in_one_line(world, monkeypatch):
    import trainables.conditioning as C

    model = load_model(Checkpoint(model=str(world / "base")), torch.device("cpu")).eval()
    batch, _ = toy_batch(world, "attack.jsonl", 4)
    monkeypatch.setattr(C, "MAX_DIM", 100)
    with pytest.raises(ValueError, match=r"conditioning.parameters: 128 parameters match, more than 100"):
        _model_loss(model, batch, ["model.norm.weight", "model.layers.1.post_attention_layernorm.*"])
    with pytest.raises(ValueError, match="conditioning.head cross_entropy: .* lower conditioning.size"):
        _head_loss(model, batch, "cross_entropy")


def test_measure_on_the_toy_world_sees_the_rescaled_defence_as_the_base(world):
    """The rescaled defence divides the features by c = 30: every eigenvalue falls 900-fold, κ does
    not move, RIR is 1. What it does to an attacker (Adam's steps are ~lr whatever the weight's
    size) is invisible to κ; λmax's ratio shows the rescaling."""
    data = Data(attack=DataSource(source=str(world / "attack.jsonl")),
                eval=DataSource(source=str(world / "eval.jsonl")))
    benign = DataSource(source=str(world / "benign_heldout.jsonl"))
    cfg = Conditioning(size=32)
    out = {d: measure(Checkpoint(model=str(world / d)), data, benign, cfg) for d in ("base", "rescaled")}
    kappa = {d: {t: r["kappa"].value for t, r in out[d].items()} for d in out}
    assert all(r["kappa"].verdict == "ok" for d in out for r in out[d].values())
    assert rir(kappa["rescaled"], kappa["base"]) == pytest.approx(1.0, rel=1e-3)
    for t in ("harmful", "benign"):
        ratio = out["rescaled"][t]["ends"].top.value / out["base"][t]["ends"].top.value
        assert ratio == pytest.approx(1 / 900, rel=1e-3)
