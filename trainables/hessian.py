"""The extreme eigenvalues of a Hessian, from Hessian-vector products alone."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SEED = 0
"""Seed of the Lanczos start vector: the same operator gives the same answer."""


@dataclass(frozen=True)
class End:
    """One extreme eigenvalue of H as Lanczos found it."""

    value: float
    error: float
    """|Hv - λv| for the unit Ritz vector v: some eigenvalue of H lies within this of `value`."""
    matvecs: int
    """Hessian-vector products spent on this end (the check included)."""
    converged: bool


@dataclass(frozen=True)
class Extremes:
    top: End
    bottom: End
    dim: int
    seconds: float

    @property
    def scale(self) -> float:
        """The spectrum's magnitude: max |λ|."""
        return max(abs(self.top.value), abs(self.bottom.value))

    @property
    def matvecs(self) -> int:
        return self.top.matvecs + self.bottom.matvecs

    @property
    def converged(self) -> bool:
        return self.top.converged and self.bottom.converged


def hvp_of(loss: Callable, x0):
    """H·v for the Hessian of the scalar `loss(x)` at x0 (a float64 tensor), as a function of a
    flat numpy vector. Reverse over reverse: grad's graph at x0 is built once, each product is
    one backward pass through it (the Hessian is symmetric, so the vector-Jacobian product of the
    gradient is H·v)."""
    import torch

    _, vjp = torch.func.vjp(torch.func.grad(loss), x0)

    def product(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(x0.shape).to(x0)
        (hv,) = vjp(t)
        return hv.detach().reshape(-1).cpu().numpy()

    return product


def extremes(hvp: Callable[[np.ndarray], np.ndarray], dim: int, rtol: float = 1e-4,
             max_matvecs: int = 3000) -> Extremes:
    """The largest and smallest eigenvalues of the symmetric operator `hvp` on R^dim, by ARPACK
    Lanczos, each checked by its residual. `rtol`: the relative accuracy asked of each end (the
    solver's tolerance is a hundredth of it, its check must pass at it); `max_matvecs`: products
    allowed per end before it is reported as it stands, unconverged."""
    if dim < 1:
        raise ValueError("the Hessian has no parameters (dim 0): nothing to measure")
    t0 = time.perf_counter()
    if dim <= 2:  # ARPACK needs k < dim - 1: two products give the whole matrix
        dense = np.stack([hvp(e) for e in np.eye(dim)])
        values = np.linalg.eigvalsh((dense + dense.T) / 2)
        ends = [End(float(values[-1]), 0.0, dim, True), End(float(values[0]), 0.0, dim, True)]
        return Extremes(ends[0], ends[1], dim, time.perf_counter() - t0)
    start = np.random.default_rng(SEED).standard_normal(dim)
    if not np.any(hvp(start)):  # H·v = 0 for a random v: H = 0 (with probability 1), e.g. LoRA's A while B = 0
        ends = [End(0.0, 0.0, 1, True), End(0.0, 0.0, 0, True)]
        return Extremes(ends[0], ends[1], dim, time.perf_counter() - t0)
    top = _end(hvp, dim, "LA", rtol, max_matvecs)
    bottom = _end(hvp, dim, "SA", rtol, max_matvecs, scale=abs(top.value) if math.isfinite(top.value) else 1.0)
    scale = max(abs(top.value), abs(bottom.value))
    # an end at (near) zero is judged against the spectrum's scale: relative to itself it never converges
    top, bottom = (e if e.converged else _judged(e, rtol, scale) for e in (top, bottom))
    return Extremes(top, bottom, dim, time.perf_counter() - t0)


def _end(hvp: Callable[[np.ndarray], np.ndarray], dim: int, which: str, rtol: float, max_matvecs: int,
         scale: float = 1.0) -> End:
    """One end by ARPACK, else LOBPCG (whose tolerance is absolute: `scale` makes it relative)."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    count = 0

    def counted(v: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        return hvp(np.asarray(v, dtype=np.float64).reshape(-1))

    op = LinearOperator((dim, dim), matvec=counted, dtype=np.float64)
    ncv = min(dim - 1, 64)
    start = np.random.default_rng(SEED).standard_normal(dim)
    try:
        values, vectors = eigsh(op, k=1, which=which, tol=rtol / 100, ncv=ncv, v0=start,
                                maxiter=max(1, max_matvecs // ncv))
    except ArpackNoConvergence as err:  # the budget ran out: keep what it had, if anything
        values, vectors = err.eigenvalues, err.eigenvectors
    if len(values) == 0:  # ARPACK keeps no estimate: LOBPCG's, after as many products again, its
        # tolerance (absolute) first against the spectrum's scale, then against the end it found
        values, vectors = _lobpcg(counted, dim, which == "LA", start, rtol / 100 * scale, max_matvecs // 2)
        if len(values) and math.isfinite(values[0]) and values[0] != 0:
            values, vectors = _lobpcg(counted, dim, which == "LA", vectors[:, 0], rtol / 100 * abs(values[0]),
                                      max_matvecs // 2)
    v = vectors[:, 0] / np.linalg.norm(vectors[:, 0])
    value = float(values[0])
    error = float(np.linalg.norm(counted(v) - value * v))
    return End(value, error, count, error <= rtol * abs(value))


def _lobpcg(product: Callable[[np.ndarray], np.ndarray], dim: int, largest: bool, start: np.ndarray,
            tol: float, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """scipy's LOBPCG from the same start: it always returns its current estimate."""
    import warnings

    from scipy.sparse.linalg import LinearOperator, lobpcg

    op = LinearOperator((dim, dim), matvec=product, dtype=np.float64)
    with warnings.catch_warnings():  # "did not converge" is what the residual check reports
        warnings.simplefilter("ignore")
        values, vectors = lobpcg(op, start[:, None].copy(), largest=largest, tol=tol, maxiter=iterations)
    return np.atleast_1d(values), vectors


def _judged(end: End, rtol: float, scale: float) -> End:
    """An end judged against the spectrum's scale (for an eigenvalue at or near 0)."""
    ok = math.isfinite(end.value) and end.error <= rtol * scale
    return End(end.value, end.error, end.matvecs, ok)
