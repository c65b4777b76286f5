"""Fixed-point solvers: pure functions `solver(f, z0, *, max_iter, tol, ...) -> (z_star, stats)`.

Hub-portable: imports only torch and the standard library.

Contract for `f`: `f(z, rows) -> z'` maps a batch of states `z` of shape `(b, ...)` to the next iterate.
`rows` is None (z is the whole batch) or a `LongTensor` of shape `(b,)` giving which batch rows `z` holds,
so that `f` can slice whatever it closes over (conditioning, masks). Solvers pass a row subset only once
some samples have converged: a converged sample stops changing and stops costing compute.

Residuals are relative, `||f(z) - z|| / ||z||`, per sample, over the positions where `mask` is True
(padding excluded). A non-finite iterate raises `FloatingPointError` (default) or, with
`on_nonfinite="flag"`, freezes that sample at its last finite iterate and sets `stats.nonfinite`.

Safety net (`divergence_patience=k`): a sample whose absolute residual `||f(z) - z||` rises for k consecutive
iterations, or that meets a non-finite iterate, is stopped and set back to its best iterate (the one with the
smallest residual), and `stats.diverged` says so. An expanding map keeps its relative residual constant while
the norm grows geometrically, so the absolute residual is the signal; a contraction never trips it (its
absolute residual falls at every iteration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Tensor = torch.Tensor
StepFn = Callable[[Tensor, Optional[Tensor]], Tensor]
_EPS = 1e-12


@dataclass
class SolverStats:
    """Per-sample solver statistics (every field has the batch as its first dim).

    iterations (`LongTensor (B,)`): evaluations of `f` spent on each sample.
    residual (`FloatTensor (B,)`): last relative residual `||f(z) - z|| / ||z||` (NaN if no iteration ran).
    converged (`BoolTensor (B,)`): the residual fell below `tol` (always False without `tol`).
    nonfinite (`BoolTensor (B,)`): a non-finite iterate was met and the sample was frozen.
    trace (`FloatTensor (B, max_iter)` or None): residual per iteration (NaN after a sample stopped).
    diverged (`BoolTensor (B,)`): the safety net stopped the sample and returned its best iterate.
    cold_start (`BoolTensor (B,)`): set by the model when it rejected a warm start (non-finite or exploding
        state) and solved from `h_pre` instead.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    nonfinite: Tensor
    trace: Optional[Tensor] = None
    diverged: Optional[Tensor] = None
    cold_start: Optional[Tensor] = None

    @classmethod
    def empty(cls, batch: int, device, max_iter: int = 0, trace: bool = False) -> "SolverStats":
        return cls(
            iterations=torch.zeros(batch, dtype=torch.long, device=device),
            residual=torch.full((batch,), float("nan"), device=device),
            converged=torch.zeros(batch, dtype=torch.bool, device=device),
            nonfinite=torch.zeros(batch, dtype=torch.bool, device=device),
            trace=torch.full((batch, max_iter), float("nan"), device=device) if trace else None,
            diverged=torch.zeros(batch, dtype=torch.bool, device=device),
            cold_start=torch.zeros(batch, dtype=torch.bool, device=device),
        )


def residual_norms(new: Tensor, old: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`(||new - old||, ||old||)` per sample (float32, no graph), over the positions where `mask` is True.

    new, old: `(B, *S, D)`; mask: `(B, *S)` bool or None. Returns two `(B,)` tensors.
    """
    new, old = new.detach(), old.detach()
    work = torch.float64 if old.dtype == torch.float64 else torch.float32  # never below fp32
    if mask is None:
        dims = tuple(range(1, old.dim()))
        return (torch.linalg.vector_norm(new - old, dim=dims, dtype=work).float(),
                torch.linalg.vector_norm(old, dim=dims, dtype=work).float())
    # Norms per position first, masked at (B, *S): no masked copies of the (B, *S, D) states, which are the
    # solver's largest per-iteration cost besides the map.
    m = mask.to(work)  # (B, *S)
    dims = tuple(range(1, m.dim()))
    diff2 = torch.linalg.vector_norm(new - old, dim=-1, dtype=work).square()  # (B, *S)
    ref2 = torch.linalg.vector_norm(old, dim=-1, dtype=work).square()
    return (diff2 * m).sum(dims).sqrt().float(), (ref2 * m).sum(dims).sqrt().float()


def relative_residual(new: Tensor, old: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """`||new - old|| / ||old||` per sample (float32), summed over positions where `mask` is True.

    new, old: `(B, *S, D)`; mask: `(B, *S)` bool or None.
    """
    diff, ref = residual_norms(new, old, mask)
    return diff / ref.clamp_min(_EPS)


def _check_args(max_iter, tol, on_nonfinite, patience=None):
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"`max_iter` must be an integer >= 0, got {max_iter!r}.")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"`divergence_patience` must be None or an integer >= 1, got {patience!r}.")
    if tol is not None and not tol > 0:
        raise ValueError(f"`tol` must be None or > 0, got {tol!r}.")
    if on_nonfinite not in ("raise", "flag"):
        raise ValueError(f"`on_nonfinite` must be 'raise' or 'flag', got {on_nonfinite!r}.")


def _rows(flags: Tensor, like: Tensor) -> Tensor:
    """A per-row `(b,)` flag shaped to broadcast against `like` `(b, ...)`."""
    return flags.view(-1, *([1] * (like.dim() - 1)))


class _ActiveSet:
    """Book-keeping shared by the solvers: which rows still iterate, their stats and the safety net."""

    def __init__(self, z0: Tensor, mask, max_iter, tol, on_nonfinite, trace, patience=None):
        self.z, self.mask, self.tol, self.on_nonfinite = z0, mask, tol, on_nonfinite
        self.stats = SolverStats.empty(z0.shape[0], z0.device, max_iter, trace)
        self.rows = torch.arange(z0.shape[0], device=z0.device)
        self.all_rows = True
        self.patience = patience
        if patience is not None:
            B = z0.shape[0]
            self.best_z = z0  # each row's iterate with the smallest residual so far (updated on the device)
            self.best_res = torch.full((B,), float("inf"), device=z0.device)
            self.last_res = torch.full((B,), float("inf"), device=z0.device)
            self.rising = torch.zeros(B, dtype=torch.long, device=z0.device)

    def current(self) -> Tensor:
        return self.z if self.all_rows else self.z[self.rows]

    def row_arg(self) -> Optional[Tensor]:
        return None if self.all_rows else self.rows

    def sub_mask(self):
        if self.mask is None or self.all_rows:
            return self.mask
        return self.mask[self.rows]

    def get(self, t: Tensor) -> Tensor:
        """The active rows of a per-sample tensor (the tensor itself while every row is active)."""
        return t if self.all_rows else t[self.rows]

    def put(self, t: Tensor, value: Tensor) -> Tensor:
        """`t` with its active rows replaced by `value` (`value` itself while every row is active)."""
        return value if self.all_rows else t.index_copy(0, self.rows, value)

    def record(self, step: int, new: Tensor, old: Tensor, norms: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Store `new` for the active rows and update the stats; `norms` = `(||f(z) - z||, ||z||)` default to
        `new` against `old`. Returns the keep-iterating mask over the active rows."""
        diff, ref = residual_norms(new, old, self.sub_mask()) if norms is None else norms
        res = diff / ref.clamp_min(_EPS)
        finite = torch.isfinite(res)  # a non-finite entry anywhere in `new` makes its residual non-finite
        new = self._nonfinite(step, new, old, finite)
        st = self.stats
        st.iterations = self.put(st.iterations, self.get(st.iterations) + 1)
        st.residual = self.put(st.residual, torch.where(finite, res, self.get(st.residual)))
        if st.trace is not None:
            st.trace[self.rows, step] = res
        keep = finite
        if self.patience is not None:
            new, keep = self._safety_net(new, diff, finite, keep)
        self.z = self.put(self.z, new)
        if self.tol is not None:
            done = keep & (res < self.tol)
            st.converged = self.put(st.converged, self.get(st.converged) | done)
            keep = keep & ~done
        return keep

    def _nonfinite(self, step, new, old, finite):
        """`new` with non-finite rows frozen at `old`. In "flag" mode this runs on the device with no host sync
        (a `where` over the state costs far less than the map); "raise" has to look, once per iteration."""
        if self.on_nonfinite == "raise":
            if not bool(finite.all()):
                raise FloatingPointError(
                    f"fixed-point solver: non-finite iterate at iteration {step + 1} for batch rows "
                    f"{self.rows[~finite].tolist()}; use on_nonfinite='flag' to freeze those samples instead."
                )
            return new
        self.stats.nonfinite = self.put(self.stats.nonfinite, self.get(self.stats.nonfinite) | ~finite)
        return torch.where(_rows(finite, new), new, old)

    def _safety_net(self, new, diff, finite, keep):
        """Stop rows whose residual rose `patience` times in a row (or that went non-finite) and set them back to
        their best iterate. Runs on the device with no host sync: the best iterate is kept as a state updated by
        `where`, and tripped rows take it by `where` (only `shrink` looks at the host, once per iteration)."""
        improved = finite & (diff < self.get(self.best_res))
        self.best_res = self.put(self.best_res, torch.where(improved, diff, self.get(self.best_res)))
        rising = torch.where(finite & (diff > self.get(self.last_res)), self.get(self.rising) + 1, 0)
        self.rising = self.put(self.rising, rising)
        self.last_res = self.put(self.last_res, torch.where(finite, diff, self.get(self.last_res)))
        tripped = (rising >= self.patience) | ~finite
        self.stats.diverged = self.put(self.stats.diverged, self.get(self.stats.diverged) | tripped)
        best = self.get(self.best_z)
        best = torch.where(_rows(improved, new), new, best)  # this iterate, where it is the best so far
        self.best_z = self.put(self.best_z, best)
        return torch.where(_rows(tripped, new), best.to(new.dtype), new), keep & ~tripped

    def shrink(self, keep: Tensor) -> bool:
        """Drop rows that stopped; returns False when no row is left."""
        if bool(keep.all()):
            return True
        self.rows = self.rows[keep]
        self.all_rows = False
        return self.rows.numel() > 0


def picard(
    f: StepFn,
    z0: Tensor,
    *,
    max_iter: int,
    tol: Optional[float] = None,
    mask: Optional[Tensor] = None,
    on_nonfinite: str = "raise",
    trace: bool = False,
    divergence_patience: Optional[int] = None,
) -> tuple[Tensor, SolverStats]:
    """Plain fixed-point (Picard) iteration `z <- f(z)`, the paper's solver.

    Args:
        f: the map, called as `f(z, rows)` (see the module docstring).
        z0 (`Tensor (B, *S, D)`): initial state.
        max_iter: iterations (an upper bound when `tol` is set).
        tol: per-sample relative-residual threshold; a sample stops once its residual is below it.
        mask (`BoolTensor (B, *S)` or None): positions counted in the residual.
        on_nonfinite: `"raise"` or `"flag"`.
        trace: also return the residual of every iteration.
        divergence_patience: enable the safety net (see the module docstring): stop a sample after this many
            consecutive rises of its residual and return its best iterate. None disables it.

    Returns:
        `(z_star, stats)`: the last iterate of every sample and its [`SolverStats`].

    Example:
        >>> z, stats = picard(lambda z, rows: torch.cos(z), torch.zeros(1, 1, 1), max_iter=100, tol=1e-6)
        >>> round(z.item(), 4), bool(stats.converged)
        (0.7391, True)
    """
    _check_args(max_iter, tol, on_nonfinite, divergence_patience)
    state = _ActiveSet(z0, mask, max_iter, tol, on_nonfinite, trace, divergence_patience)
    for step in range(max_iter):
        old = state.current()
        keep = state.record(step, f(old, state.row_arg()), old)
        if not state.shrink(keep):
            break
    return state.z, state.stats


def _anderson_mix(F: Tensor, G: Tensor, n: int, lam: float, beta: float) -> Tensor:
    """One Anderson update from histories X (implicit), F = f(X), G = F - X, each `(b, n, N)`.

    Solves min_a ||G^T a||^2 + lam ||a||^2 s.t. sum(a) = 1 through the bordered normal equations.
    Returns the new iterate `(b, N)` = beta * F^T a + (1 - beta) * X^T a.
    """
    b = G.shape[0]
    gram = torch.bmm(G, G.transpose(1, 2))  # (b, n, n)
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]  # ridge relative to |G|^2
    gram = gram + lam * scale * torch.eye(n, dtype=gram.dtype, device=gram.device)
    H = torch.zeros(b, n + 1, n + 1, dtype=gram.dtype, device=gram.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    H[:, 1:, 1:] = gram
    rhs = torch.zeros(b, n + 1, 1, dtype=gram.dtype, device=gram.device)
    rhs[:, 0] = 1
    alpha = torch.linalg.solve(H, rhs)[:, 1:, 0]  # (b, n)
    fx = torch.bmm(alpha.unsqueeze(1), F)[:, 0]
    if beta == 1.0:
        return fx
    x = fx - torch.bmm(alpha.unsqueeze(1), G)[:, 0]  # X^T a = F^T a - G^T a
    return beta * fx + (1 - beta) * x


def anderson(
    f: StepFn,
    z0: Tensor,
    *,
    max_iter: int,
    tol: Optional[float] = None,
    mask: Optional[Tensor] = None,
    on_nonfinite: str = "raise",
    trace: bool = False,
    divergence_patience: Optional[int] = None,
    memory: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration of `z <- f(z)`: each step mixes the last `memory` evaluations of `f`.

    Same arguments and returns as [`picard`], plus `memory` (history size), `beta` (mixing) and `lam`
    (ridge term of the least-squares problem). Costs one `f` evaluation per iteration, like Picard, plus
    histories of 2 * memory flattened states per sample. The mixing runs in float32 (float64 for float64
    states) over the positions in `mask`; padded positions just follow `f`.
    """
    _check_args(max_iter, tol, on_nonfinite, divergence_patience)
    state = _ActiveSet(z0, mask, max_iter, tol, on_nonfinite, trace, divergence_patience)
    shape = z0.shape[1:]
    B, N = z0.shape[0], z0[0].numel()
    work = torch.float64 if z0.dtype == torch.float64 else torch.float32  # mixing never below fp32
    weight = None if mask is None else mask.unsqueeze(-1).expand_as(z0).reshape(B, N).to(work)  # (B, N)
    hist_f = torch.zeros(B, memory, N, device=z0.device, dtype=work)  # f(x_k), flattened
    hist_g = torch.zeros(B, memory, N, device=z0.device, dtype=work)  # f(x_k) - x_k, masked
    for step in range(max_iter):
        old = state.current()
        rows = state.rows
        fx = f(old, state.row_arg())
        k, n = step % memory, min(step + 1, memory)
        g = (fx - old).reshape(-1, N).to(work)
        hist_f[rows, k] = fx.reshape(-1, N).to(work)
        hist_g[rows, k] = g if weight is None else g * weight[rows]
        new = _anderson_mix(hist_f[rows, :n], hist_g[rows, :n], n, lam, beta)
        if weight is not None:  # padding positions are not part of the problem: plain Picard there
            new = torch.where(weight[rows] > 0, new, fx.reshape(-1, N).to(work))
        new = new.to(z0.dtype).reshape(-1, *shape)
        mixed_ok = torch.isfinite(new).flatten(1).all(1)  # a singular mix falls back to the plain step
        if not bool(mixed_ok.all()):
            new = torch.where(_rows(mixed_ok, new), new, fx)
        keep = state.record(step, new, old, norms=residual_norms(fx, old, state.sub_mask()))
        if not state.shrink(keep):
            break
    return state.z, state.stats


SOLVERS = {"picard": picard, "anderson": anderson}


def get_solver(name: str):
    """Look up a solver by name; raises `ValueError` listing the valid names."""
    if name not in SOLVERS:
        raise ValueError(f"unknown fixed-point solver {name!r}; valid names: {sorted(SOLVERS)}.")
    return SOLVERS[name]
