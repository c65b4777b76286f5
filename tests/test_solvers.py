"""Solvers on contractions with known fixed points."""

import pytest
import torch

from fpmgm_hf.solver_fpmgm import anderson, get_solver, picard, relative_residual


def linear_contraction(batch=3, dim=6, rho=0.9, seed=0):
    """f(z) = A z + b with spectral norm rho; fixed point z* = (I - A)^-1 b."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(-rho, rho, dim, dtype=torch.float64)) @ q.T
    b = torch.randn(batch, 1, dim, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - A, b.squeeze(1).T).T.unsqueeze(1)

    def f(z, rows):
        bb = b if rows is None else b[rows]
        return z @ A.T + bb

    return f, z_star, b


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_solvers_converge_to_known_fixed_point(solver):
    f, z_star, b = linear_contraction()
    z, stats = get_solver(solver)(f, torch.zeros_like(b), max_iter=400, tol=1e-10)
    torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)
    assert stats.converged.all() and (stats.residual < 1e-10).all()


def test_cosine_scalar_fixed_point():
    z, stats = picard(lambda z, rows: torch.cos(z), torch.zeros(2, 1, 1, dtype=torch.float64), max_iter=200, tol=1e-12)
    assert abs(z[0].item() - 0.7390851332151607) < 1e-10
    assert stats.iterations[0] < 200


def test_anderson_needs_fewer_iterations_on_linear_contraction():
    f, z_star, b = linear_contraction(rho=0.95)
    _, sp = picard(f, torch.zeros_like(b), max_iter=1000, tol=1e-8)
    _, sa = anderson(f, torch.zeros_like(b), max_iter=1000, tol=1e-8, memory=6)
    assert sp.converged.all() and sa.converged.all()
    assert (sa.iterations < sp.iterations).all(), (sa.iterations, sp.iterations)


def test_per_sample_stopping_leaves_converged_samples_untouched():
    # Row 0 starts at its fixed point, row 1 far away: row 0 must stop after 1 iteration and never change.
    f, z_star, b = linear_contraction(batch=2)
    z0 = torch.stack([z_star[0], torch.zeros_like(z_star[1])])
    seen_rows, outputs = [], []

    def spy(z, rows):
        seen_rows.append(None if rows is None else rows.tolist())
        outputs.append(f(z, rows))
        return outputs[-1]

    z, stats = picard(spy, z0, max_iter=300, tol=1e-9)
    assert stats.iterations[0] == 1 and stats.iterations[1] > 10
    assert torch.equal(z[0], outputs[0][0])  # exactly the one iterate it computed
    assert all(r == [1] for r in seen_rows[1:]), "converged row kept being evaluated"


def test_residual_ignores_padding_positions():
    new = torch.tensor([[[1.0], [100.0]]])
    old = torch.tensor([[[1.0], [0.0]]])
    mask = torch.tensor([[True, False]])
    assert relative_residual(new, old, mask).item() == 0.0
    assert relative_residual(new, old).item() > 1


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_nonfinite_iterate_raises_or_flags(solver):
    def f(z, rows):  # batch row 0 blows up
        out = z + 1
        rows = torch.arange(z.shape[0]) if rows is None else rows
        out[rows == 0] = float("nan")
        return out

    z0 = torch.zeros(2, 3, 4)
    with pytest.raises(FloatingPointError, match="non-finite"):
        get_solver(solver)(f, z0, max_iter=3)
    z, stats = get_solver(solver)(f, z0, max_iter=3, on_nonfinite="flag")
    assert stats.nonfinite.tolist() == [True, False]
    assert torch.isfinite(z).all() and torch.equal(z[0], z0[0])


def test_trace_and_bad_arguments():
    f, _, b = linear_contraction()
    _, stats = picard(f, torch.zeros_like(b), max_iter=5, trace=True)
    assert stats.trace.shape == (3, 5) and torch.isfinite(stats.trace).all()
    with pytest.raises(ValueError, match="max_iter"):
        picard(f, b, max_iter=-1)
    with pytest.raises(ValueError, match="valid names"):
        get_solver("broyden")
