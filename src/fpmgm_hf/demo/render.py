"""Drawing for the Gradio demo (`app.py`): text canvases and the status line as HTML, the solver plot, the results
table and image grids. Pure functions of a run's tensors and numbers (`fpmgm_hf.demo.app` produces them)."""

from __future__ import annotations

import html
import math
from typing import Optional

import torch

from .app import LoadedModel, RunResult

CANVAS_CSS = """
.fpmgm-canvas { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 15px; line-height: 1.9;
  white-space: pre-wrap; word-break: break-all; padding: 10px; border: 1px solid #d0d4dc; border-radius: 8px;
  min-height: 5em; background: #fff; color: #111; }
.fpmgm-canvas .tok-mask { background: #c9ced8; color: #6b7280; border-radius: 3px; }
.fpmgm-canvas .tok-new { background: #ffd54f; color: #111; border-radius: 3px; font-weight: 600; }
.fpmgm-canvas .tok-fixed { color: #1d4ed8; font-weight: 600; }
.fpmgm-canvas .tok-special { color: #9ca3af; font-size: 11px; }
.fpmgm-canvas .canvas-title { display: block; font-family: sans-serif; font-size: 13px; color: #374151;
  white-space: normal; margin-bottom: 4px; }
.fpmgm-status { font-family: sans-serif; font-size: 14px; padding: 8px 10px; border-radius: 8px; }
.fpmgm-status progress { width: 100%; height: 10px; }
.status-error { background: #fee2e2; color: #7f1d1d; border: 1px solid #fca5a5; }
.status-running { background: #eff6ff; color: #1e3a8a; }
.status-done { background: #ecfdf5; color: #064e3b; }
.status-idle { background: #f3f4f6; color: #374151; }
"""
MASK_GLYPH = "\u2591"  # light shade: the page's mask marker


def canvas_html(loaded: LoadedModel, canvas, previous, initial, title: str, element_id: str) -> str:
    """One text canvas as HTML: fixed tokens (prompt, suffix) blue, masks grey, tokens revealed since the last
    frame yellow. `canvas`, `previous`, `initial` are 1-D ids."""
    tok, mask = loaded.tokenizer, loaded.model.config.mask_token_id
    special = set(tok.all_special_ids) - {mask}
    pieces: dict[int, str] = {}
    spans = []
    for now, before, first in zip(canvas.tolist(), previous.tolist(), initial.tolist(), strict=True):
        if now == mask:
            spans.append(f'<span class="tok tok-mask">{MASK_GLYPH}</span>')
            continue
        if now not in pieces:
            text = tok.convert_ids_to_tokens(now) if now in special else tok.decode([now])
            pieces[now] = html.escape(text)
        kind = "fixed" if first != mask else "new" if before == mask else "special" if now in special else "gen"
        spans.append(f'<span class="tok tok-{kind}">{pieces[now]}</span>')
    masks = int((canvas == mask).sum())
    return (f'<div class="fpmgm-canvas" id="{element_id}" data-masks="{masks}">'
            f'<span class="canvas-title">{html.escape(title)}</span>{"".join(spans)}</div>')


def status_html(kind: str, message: str, progress: Optional[tuple[int, int]] = None) -> str:
    """The page's status line: kind is 'idle', 'running', 'done' or 'error' (role=alert, so it is read out)."""
    role = ' role="alert"' if kind == "error" else ""
    bar = f'<progress value="{progress[0]}" max="{progress[1]}"></progress>' if progress else ""
    return (f'<div class="fpmgm-status status-{kind}" data-state="{kind}"{role}>'
            f"{html.escape(message)}{bar}</div>")


def decoded_text(loaded: LoadedModel, canvas) -> str:
    return loaded.tokenizer.decode(canvas.tolist(), skip_special_tokens=True)


def solver_figure(results: list[RunResult], live: Optional[tuple[str, list]] = None, total: Optional[int] = None):
    """Per step: fixed-point iterations (allotted dashed) and the solver's last relative residual (log scale),
    one line per model. `live` (name, Frame.live) adds the run in progress, drawn on an x axis of `total` steps.
    A `matplotlib.figure.Figure`, not pyplot: nothing global."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=100)
    ax_it, ax_res = fig.subplots(2, 1, sharex=True)
    series = [(r.name, r.iterations, r.residuals, r.allotted) for r in results]
    if live is not None:
        series.append((live[0] + " (running)", [s[0] for s in live[1]], [s[1] for s in live[1]], None))
    for i, (name, iters, residuals, allotted) in enumerate(series):
        color = f"C{i}"
        steps = list(range(1, len(iters) + 1))
        ax_it.plot(steps, [math.nan if v is None else v for v in iters], "o-", ms=3, color=color, label=name)
        if allotted:
            ax_it.plot(steps, allotted, "--", color=color, alpha=0.5, lw=1)
        shown = [i for i, v in enumerate(residuals) if v is not None and math.isfinite(v) and v > 0]
        if shown:
            ax_res.semilogy([steps[i] for i in shown], [residuals[i] for i in shown], "o-", ms=3, color=color)
    ax_it.set_ylabel("FP iterations")
    ax_it.set_title("Solver per denoising step (dashed: iterations the budget allots)", fontsize=10)
    ax_res.set_ylabel("residual")
    ax_res.set_xlabel("step")
    if series:
        ax_it.legend(fontsize=8, loc="upper right")
    longest = max([len(s[1]) for s in series] + [total or 0, 1])
    ax_res.set_xlim(0.5, longest + 0.5)
    ax_res.xaxis.get_major_locator().set_params(integer=True)
    ax_res.grid(alpha=0.3)
    ax_it.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def summary_markdown(results: list[RunResult]) -> str:
    lines = ["| model | steps x blocks | block passes (budget) | calls | wall time | diverged | cold starts |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        budget = "" if r.budget is None else f" ({r.budget * max(1, r.num_blocks)})"
        lines.append(f"| {r.name} | {r.num_steps} x {r.num_blocks} | {r.block_passes}{budget} | {r.nfe} | "
                     f"{r.wall_s:.2f} s | {r.diverged} | {r.cold_starts} |")
    return "\n".join(lines)


def image_grid(loaded: LoadedModel, canvas, previous, per_class: int, scale: int = 4):
    """`(H, W, 3)` uint8: one column per class, one row per sample. Masked token cells are a grey checker, cells
    revealed since the last frame are tinted yellow."""
    import numpy as np

    mask = loaded.model.config.mask_token_id
    rows_t, cols_t = loaded.model.config.grid_size
    masked = canvas == mask
    with torch.no_grad():
        pixels = loaded.vq.decode(canvas.masked_fill(masked, 0).clamp_max(loaded.vq.config.codebook_size - 1))
    pixels = pixels.mean(1).cpu().numpy()  # (N, H, W) grey
    n, h, w = pixels.shape
    cell_h, cell_w = h // rows_t, w // cols_t
    up = lambda m: np.kron(m.reshape(-1, rows_t, cols_t).numpy(), np.ones((cell_h, cell_w)))[:, :h, :w]  # noqa: E731
    hidden, new = up(masked), up((previous == mask) & ~masked)
    checker = 0.55 + 0.15 * ((np.indices((h, w)).sum(0) // 2) % 2)
    rgb = np.repeat(pixels[..., None], 3, -1)
    rgb = np.where(hidden[..., None] > 0, checker[None, ..., None] * np.array([0.85, 0.88, 0.95]), rgb)
    rgb = np.where(new[..., None] > 0, 0.55 * rgb + 0.45 * np.array([1.0, 0.84, 0.2]), rgb)
    classes = n // per_class
    pad = 2
    grid = np.ones((per_class * (h + pad) + pad, classes * (w + pad) + pad, 3))
    for i in range(n):  # copies of a class are adjacent: sample i is class i // per_class, copy i % per_class
        r, c = i % per_class, i // per_class
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = rgb[i]
    grid = np.kron(grid, np.ones((scale, scale, 1)))
    return (grid.clip(0, 1) * 255).round().astype(np.uint8)
