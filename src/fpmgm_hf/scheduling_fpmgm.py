"""Model-free pieces of masked generation: noise schedule, SUBS, token sampling, the MDLM ancestral and
MaskGIT confidence transitions, three-state-reuse weights and compute-budget allocation.

Hub-portable: imports only torch and the standard library. Nothing here calls a network; every random
draw takes an explicit `torch.Generator`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor
FP_SCHEDULES = ("decreasing", "fixed", "increasing", "cosine", "front_loaded")
# How the confidence sampler ranks masked positions (Dream's `alg` names).
CONFIDENCE_ALGS = ("maskgit_plus", "topk_margin", "entropy", "origin")
# Upper bounds per block: beyond them a call would run for minutes, so they are refused up front.
MAX_NUM_STEPS = 10_000
MAX_FP_ITERS_PER_STEP = 1_000
MAX_BUDGET = 1_000_000


# ----------------------------------------------------------------------------------------- noise schedule


def loglinear_mask_prob(t: Tensor, eps: float = 1e-3) -> Tensor:
    """Probability that a token is masked at time t, `1 - alpha_t = (1 - eps) t` (MDLM log-linear)."""
    return (1 - eps) * t


def loglinear_sigma(t: Tensor, eps: float = 1e-3) -> Tensor:
    """Total noise `sigma(t) = -log(1 - (1 - eps) t)`: the value MDLM feeds its timestep embedder."""
    return -torch.log1p(-(1 - eps) * t)


# ------------------------------------------------------------------------------------- logits and draws


def subs_log_probs(logits: Tensor, canvas: Tensor, mask_id: int) -> Tensor:
    """SUBS parameterisation in float64: the mask token gets zero probability and visible tokens carry over.

    logits: (B, L, V); canvas: (B, L). Returns log p(x0 | x_t) of shape (B, L, V), float64.
    """
    logits = logits.double().clone()
    logits[..., mask_id] = -math.inf
    logp = torch.log_softmax(logits, dim=-1)
    visible = canvas != mask_id
    carry = torch.full_like(logp, -math.inf).scatter_(-1, canvas.unsqueeze(-1), 0.0)
    return torch.where(visible.unsqueeze(-1), carry, logp)


def filter_log_probs(
    logp: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> Tensor:
    """Temperature, top-k and nucleus filtering of log-probabilities (..., V) with transformers' warpers (as
    `GenerationMixin` samples); returns renormalised log-probs. temperature 0 is greedy: only the argmax survives."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if temperature == 0:
        best = logp.argmax(-1, keepdim=True)
        return torch.full_like(logp, -math.inf).scatter_(-1, best, 0.0)
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k is not None and top_k < logp.shape[-1]:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    if warpers:
        shape = logp.shape
        logp = warpers(None, logp.reshape(-1, shape[-1])).reshape(shape)
    return torch.log_softmax(logp, dim=-1)


def subs_rows(logits: Tensor, mask_id: int) -> Tensor:
    """SUBS log-probs of masked positions only, `(N, V)` float64: the mask token gets zero probability (a masked
    position has no token to carry over)."""
    logits = logits.double().clone()
    logits[..., mask_id] = -math.inf
    return torch.log_softmax(logits, dim=-1)


def sample_categorical(logp: Tensor, generator: Optional[torch.Generator] = None,
                       u: Optional[Tensor] = None) -> Tensor:
    """Exact categorical draws from log-probs (..., V) by the inverse CDF in float64: one uniform per row, a
    cumulative sum and a binary search (the exponential race needs V exponentials per row). `u` (...,): the
    uniforms in [0, 1) to use instead of drawing them."""
    probs = logp.double().exp()  # filtered tokens: exactly 0
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:]
    if u is None:
        u = _uniform(cdf.shape[:-1], cdf.device, generator)
    target = u.to(cdf).unsqueeze(-1) * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # stay inside the last bin
    # The first index whose cdf exceeds the target: its probability is > 0, so a filtered token is never drawn.
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def _uniform(shape, device, generator) -> Tensor:
    return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)


def draw_rows(logits_fn, n: int, vocab_size: int, mask_id: int, *, temperature: float = 1.0,
              top_k: Optional[int] = None, top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
              alg: Optional[str] = None, rank_unsharpened: bool = False, device=None, processors=None,
              rows_fn=None, max_elements: int = 1 << 25) -> tuple[Tensor, Optional[Tensor]]:
    """Tokens for `n` masked positions, drawn in float64 from SUBS (mask token excluded) after temperature /
    top-k / top-p, and with `alg` their confidence scores (float64; `rank_unsharpened`: scored on the temperature-1
    distribution, for greedy decoding). `logits_fn(start, end) -> (end - start, V)` gives raw logits of a slice of
    the positions; slices of at most `max_elements` logits are processed at a time, so no `(n, V)` float64 tensor
    is ever built. The uniforms are drawn up front: the result does not depend on the slicing. `processors`: a
    transformers `LogitsProcessorList` run on each slice, with `rows_fn(start, end)` as its `input_ids` (the canvas
    row of each position). Returns `(tokens (n,), scores (n,) or None)`."""
    u = _uniform((n,), device, generator)
    tokens, scores = [], []
    step = max(1, max_elements // vocab_size)
    for start in range(0, n, step):
        end = min(n, start + step)
        base = subs_rows(logits_fn(start, end), mask_id)  # (k, V)
        if processors:
            base = torch.log_softmax(processors(rows_fn(start, end) if rows_fn else None, base), dim=-1)
        logp = filter_log_probs(base, temperature, top_k, top_p)
        drawn = sample_categorical(logp, u=u[start:end])
        tokens.append(drawn)
        if alg is not None:
            scored = filter_log_probs(base, 1.0, top_k, top_p) if rank_unsharpened else logp
            scores.append(confidence_scores(scored, drawn, alg, generator))
    empty = torch.zeros(0, dtype=torch.long, device=device)
    out = torch.cat(tokens) if tokens else empty
    return out, (torch.cat(scores) if scores else empty.double()) if alg is not None else None


# ------------------------------------------------------------------------------------------ transitions


def ancestral_reveal(canvas: Tensor, t: float, s: float, mask_id: int, active: Tensor,
                     generator: Optional[torch.Generator] = None, eps: float = 1e-3) -> Tensor:
    """Which masked, active positions unmask in MDLM's reverse step from t to s < t, `(B, L)` bool.

    Under SUBS a masked position unmasks with probability (alpha_s - alpha_t) / (1 - alpha_t) whatever token it
    becomes, so this is drawn first and the token only where it unmasks (reveal-first: the output head and the
    categorical draw are paid once per position over a whole generation). At s = 0 every masked position unmasks.
    """
    m_t, m_s = (1 - eps) * t, (1 - eps) * s
    reveal_prob = 1.0 if s <= 0 else (m_t - m_s) / m_t
    masked = (canvas == mask_id) & active
    return masked & (_uniform(canvas.shape, canvas.device, generator) < reveal_prob)


def ancestral_step(
    canvas: Tensor,
    logp_x0: Tensor,
    t: float,
    s: float,
    mask_id: int,
    active: Tensor,
    generator: Optional[torch.Generator] = None,
    eps: float = 1e-3,
) -> Tensor:
    """MDLM's reverse step from time t to s < t (log-linear schedule, SUBS) given full log-probs.

    Each masked, active position is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), its token
    drawn from p(x0 | x_t); at s = 0 every masked position is revealed. Visible tokens never change.
    canvas: (B, L); logp_x0: (B, L, V) already filtered; active: (B, L) bool (False = padding). `generate`
    takes the same step without the full log-probs (`ancestral_reveal` + `draw_rows`).
    """
    reveal = ancestral_reveal(canvas, t, s, mask_id, active, generator, eps)
    out = canvas.clone()
    out[reveal] = sample_categorical(logp_x0[reveal], generator)
    return out


def mask_schedule(ratio: Tensor, kind: str = "cosine") -> Tensor:
    """Fraction of the initially masked tokens still masked at progress `ratio` in [0, 1]."""
    if kind == "cosine":
        return torch.cos(ratio * math.pi / 2)
    if kind == "linear":
        return 1 - ratio
    if kind == "arccos":
        return torch.arccos(ratio) / (math.pi / 2)
    raise ValueError(f"unknown mask schedule {kind!r}; valid names: ['arccos', 'cosine', 'linear'].")


def confidence_scores(
    logp: Tensor, tokens: Tensor, alg: str = "maskgit_plus", generator: Optional[torch.Generator] = None
) -> Tensor:
    """How sure the model is at every position, float64 `(B, L)`; higher is revealed first.

    maskgit_plus: log p of the drawn token (MaskGIT; Dream ranks by p, the same order). topk_margin: top-1
    minus top-2 probability. entropy: minus the entropy of p. origin: uniform noise (a random order).
    logp: (B, L, V) log-probabilities; tokens: (B, L) the drawn tokens.
    """
    if alg == "maskgit_plus":
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()
    if alg == "topk_margin":
        top2 = logp.double().topk(min(2, logp.shape[-1]), dim=-1).values.exp()  # (B, L, 2)
        return top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0)
    if alg == "entropy":
        p = logp.double().exp()
        return torch.where(p > 0, p * logp.double(), torch.zeros_like(p)).sum(-1)  # 0 log 0 = 0
    if alg == "origin":
        return _uniform(tokens.shape, tokens.device, generator)
    raise ValueError(f"`alg`={alg!r} is invalid; allowed: {list(CONFIDENCE_ALGS)}.")


def confidence_step(
    canvas: Tensor,
    logp_x0: Tensor,
    step: int,
    num_steps: int,
    initial_masked: Tensor,
    mask_id: int,
    active: Tensor,
    generator: Optional[torch.Generator] = None,
    randomness: float = 0.0,
    schedule: str = "cosine",
    order: Optional[Tensor] = None,
    alg: str = "maskgit_plus",
    alg_temp: float = 0.0,
    score_logp: Optional[Tensor] = None,
) -> Tensor:
    """MaskGIT step given full log-probs `logp_x0 (B, L, V)`: draw a token at every masked position, score it by
    `alg` on `score_logp` (default `logp_x0`; greedy decoding passes the unsharpened distribution so that scores are
    not all tied), then `confidence_select`. `generate` takes the same step from the masked positions' logits only
    (`draw_rows`)."""
    masked = (canvas == mask_id) & active
    tokens = torch.where(masked, sample_categorical(logp_x0, generator), canvas)
    score = None
    if order is None:
        score = confidence_scores(logp_x0 if score_logp is None else score_logp, tokens, alg, generator)
    return confidence_select(canvas, tokens, score, step, num_steps, initial_masked, mask_id, active, generator,
                             randomness, schedule, order, alg_temp)


def confidence_select(
    canvas: Tensor,
    tokens: Tensor,
    score: Optional[Tensor],
    step: int,
    num_steps: int,
    initial_masked: Tensor,
    mask_id: int,
    active: Tensor,
    generator: Optional[torch.Generator] = None,
    randomness: float = 0.0,
    schedule: str = "cosine",
    order: Optional[Tensor] = None,
    alg_temp: float = 0.0,
) -> Tensor:
    """MaskGIT's selection: keep the drawn `tokens (B, L)` at the k most confident masked positions by `score (B, L)`
    (float64, read at masked positions only).

    k makes each row's masked count follow `schedule` from `initial_masked` (B,) to 0 at the last step,
    at least one token per step while any is masked. The score gets Gumbel noise scaled by
    `randomness * (1 - progress)` (MaskGIT, annealed) + `alg_temp` (Dream: positions drawn from
    softmax(score / alg_temp), i.e. Gumbel-top-k). With `order` (L,) (e.g. Halton), positions are revealed in that
    fixed order instead and `score` is not used.
    """
    masked = (canvas == mask_id) & active
    progress = torch.tensor((step + 1) / num_steps, dtype=torch.float64)
    keep_masked = torch.floor(initial_masked.double() * mask_schedule(progress, schedule)).long()
    n_masked = masked.sum(1)
    k = (n_masked - keep_masked).clamp_min(torch.minimum(n_masked, torch.ones_like(n_masked)))  # (B,)
    if step == num_steps - 1:
        k = n_masked
    if order is not None:
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        score = -rank.double().expand(canvas.shape).clone()
    else:
        score = score.double()
        if randomness > 0 or alg_temp > 0:
            gumbel = -torch.log(-torch.log(_uniform(canvas.shape, canvas.device, generator).clamp_min(1e-20)))
            score = score + (randomness * (1 - float(progress)) + alg_temp) * gumbel
    score = score.masked_fill(~masked, -math.inf)
    ranked = score.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of every position
    reveal = masked & (ranked < k[:, None])
    return torch.where(reveal, tokens, canvas)


def halton_order(rows: int, cols: int) -> Tensor:
    """A reveal order over a rows x cols grid from the 2-D Halton sequence (bases 2, 3): positions are
    spread evenly at every stage. Returns a permutation of range(rows * cols) as a LongTensor."""

    def radical_inverse(i: int, base: int) -> float:
        f, r = 1.0, 0.0
        while i > 0:
            f /= base
            r += f * (i % base)
            i //= base
        return r

    seen, order, i = set(), [], 0
    while len(order) < rows * cols:
        i += 1
        pos = int(radical_inverse(i, 2) * rows) * cols + int(radical_inverse(i, 3) * cols)
        if pos not in seen:
            seen.add(pos)
            order.append(pos)
        if i > 1000 * rows * cols:  # cannot happen for a low-discrepancy sequence; guard anyway
            order += [p for p in range(rows * cols) if p not in seen]
    return torch.tensor(order, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- reuse


def three_state_gamma(
    previous: Tensor,
    current: Tensor,
    mask_id: int,
    active: Optional[Tensor] = None,
    gamma_mask_min: float = 0.75,
    gamma_mask_max: float = 0.90,
    gamma_changed: float = 0.2,
) -> Tensor:
    """Per-token 3SR weight of the previous fixed point (paper Algorithm 1).

    unchanged visible token: 1; still masked: gamma_mask_min + (gamma_mask_max - gamma_mask_min) * v, with v
    the fraction of visible (non-padding) tokens in the current canvas; anything else (newly revealed): gamma_changed.
    previous, current: (B, L) canvases; active: (B, L) bool (False = padding). Returns (B, L) float.
    """
    active = torch.ones_like(current, dtype=torch.bool) if active is None else active
    visible = (current != mask_id) & active
    frac = visible.sum(1).double() / active.sum(1).clamp_min(1).double()  # (B,)
    g_mask = (gamma_mask_min + (gamma_mask_max - gamma_mask_min) * frac)[:, None].expand_as(current)
    same = previous == current
    gamma = torch.full(current.shape, gamma_changed, dtype=torch.float64, device=current.device)
    gamma = torch.where(same & (current == mask_id), g_mask, gamma)
    gamma = torch.where(same & (current != mask_id), torch.ones_like(gamma), gamma)
    return gamma.float()


# --------------------------------------------------------------------------------------------- budget


def schedule_weights(kind: str, num_steps: int) -> list[float]:
    """Relative share of the fixed-point iterations given to each denoising step."""
    T = num_steps
    pos = [(i + 0.5) / T for i in range(T)]
    if kind == "fixed":
        return [1.0] * T
    if kind == "decreasing":  # more iterations early, when most tokens are masked
        return [1.5 - p for p in pos]
    if kind == "increasing":
        return [0.5 + p for p in pos]
    if kind == "cosine":  # peaked in the middle of sampling
        return [math.sin(math.pi * p) + 1e-3 for p in pos]
    if kind == "front_loaded":  # the first quarter of the steps gets triple weight
        return [3.0 if p < 0.25 else 1.0 for p in pos]
    raise ValueError(f"unknown `fp_schedule` {kind!r}; valid names: {list(FP_SCHEDULES)}.")


def allocate_iterations(total: int, num_steps: int, kind: str) -> list[int]:
    """Split `total` iterations over `num_steps` steps, at least 1 each, following `schedule_weights`.

    Largest-remainder rounding: the result sums to exactly `total`.
    """
    if total < num_steps:
        raise ValueError(f"cannot give {num_steps} steps at least one iteration each from {total} iterations.")
    w = schedule_weights(kind, num_steps)
    extra = total - num_steps
    shares = [extra * wi / sum(w) for wi in w]
    alloc = [1 + int(math.floor(s)) for s in shares]
    left = total - sum(alloc)
    by_remainder = sorted(range(num_steps), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in by_remainder[:left]:
        alloc[i] += 1
    return alloc


def plan_budget(
    budget: Optional[int],
    num_steps: Optional[int],
    k_pre: int,
    k_fp: int,
    k_post: int,
    kind: str = "decreasing",
    iters_per_step: int = 4,
) -> list[int]:
    """Fixed-point iterations per step so that sum_i (k_pre + n_i * k_fp + k_post) <= budget.

    Without a budget every step gets `iters_per_step`. Without `num_steps` they are chosen so each step
    averages about `iters_per_step` iterations. For an explicit stack (k_fp = 0) steps = budget // layers.
    Raises `ValueError` (naming `budget` and the minimum) when the budget cannot pay for the steps, and when
    it would need more than `MAX_NUM_STEPS` steps or `MAX_FP_ITERS_PER_STEP` iterations in a step.
    """
    per_step_min = k_pre + k_fp + k_post
    if budget is None:
        T = 16 if num_steps is None else num_steps
        _check_steps(T, "num_steps")
        return [iters_per_step if k_fp else 0] * T
    if k_fp == 0:
        T = budget // per_step_min if num_steps is None else num_steps
        if T < 1 or T * per_step_min > budget:
            raise ValueError(
                f"`budget`={budget} is below the minimum {max(T, 1) * per_step_min} block passes for "
                f"{max(T, 1)} step(s) of a {per_step_min}-layer model."
            )
        _check_steps(T, "budget" if num_steps is None else "num_steps")
        return [0] * T
    T = num_steps if num_steps is not None else max(1, budget // (k_pre + k_post + iters_per_step * k_fp))
    if T * per_step_min > budget:
        raise ValueError(
            f"`budget`={budget} is below the minimum {T * per_step_min} block passes for num_steps={T} "
            f"(each step costs at least {per_step_min} = K_pre + 1*K_fp + K_post)."
        )
    _check_steps(T, "budget" if num_steps is None else "num_steps")
    total_iters = (budget - T * (k_pre + k_post)) // k_fp
    plan = allocate_iterations(total_iters, T, kind)  # T <= MAX_NUM_STEPS: cheap
    if max(plan) > MAX_FP_ITERS_PER_STEP:
        raise ValueError(
            f"`budget`={budget} gives {max(plan)} fixed-point iterations to one step; at most "
            f"{MAX_FP_ITERS_PER_STEP} are allowed (pass more `num_steps` or a smaller budget)."
        )
    return plan


def _check_steps(T: int, name: str) -> None:
    if T > MAX_NUM_STEPS:
        raise ValueError(
            f"`{name}` asks for {T} denoising steps; at most {MAX_NUM_STEPS} per block are allowed "
            "(pass a smaller budget or an explicit `num_steps`)."
        )
