"""Sweep points and their reports: bootstrap intervals, the best step count per budget, markdown tables and
the quality-vs-budget plot. Used by `fpmgm-eval sweep` and the reproduction scripts."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch


@dataclass
class SweepPoint:
    """One scored setting. `status` is "ok", "pilot" (a step-count candidate scored on few samples) or
    "diverged" (the strict solver met a non-finite iterate). `gen_ppl` = exp(mean per-sample NLL) under
    `evaluator`, `ci95` its 95% bootstrap interval over samples."""

    model: str
    reuse: str
    fp_schedule: str
    budget: int
    num_steps: int
    gen_ppl: float
    pooled_ppl: float
    entropy: float
    block_passes: float
    seconds: float
    samples_file: str = ""
    extra: dict = field(default_factory=dict)
    evaluator: str = ""
    ci95: list = field(default_factory=lambda: [math.nan, math.nan])
    n_samples: int = 0
    status: str = "ok"
    fp_tol: Optional[float] = None

    @property
    def row(self) -> tuple:
        """The table row this point belongs to (everything but budget and step count)."""
        tol = "" if self.fp_tol is None else f"tol {self.fp_tol:g}"
        return (self.model, self.reuse, self.fp_schedule, tol, self.evaluator)


def bootstrap_ci(per_sample_nll: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of `exp(mean NLL)` over samples (NaN samples dropped)."""
    nll = torch.as_tensor(list(per_sample_nll), dtype=torch.float64)
    nll = nll[~torch.isnan(nll)]
    if nll.numel() < 2:
        return [math.nan, math.nan]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nll.numel(), (resamples, nll.numel()), generator=g)
    means = nll[idx].mean(1).exp()
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [lo, hi]


def _rank(p: SweepPoint) -> tuple:
    return (math.isnan(p.gen_ppl), p.gen_ppl)  # diverged points lose to any finite one


def best_per_budget(points: list[SweepPoint]) -> list[SweepPoint]:
    """The lowest-gen-PPL step count for every (row, budget) among final (non-pilot) points; diverged points
    only where every step count diverged."""
    best: dict[tuple, SweepPoint] = {}
    for p in points:
        if p.status == "pilot":
            continue
        key = (p.row, p.budget)
        if key not in best or _rank(p) < _rank(best[key]):
            best[key] = p
    return sorted(best.values(), key=lambda p: (p.row, p.budget))


def markdown_table(points: list[SweepPoint], lm_info: dict) -> str:
    """One table per evaluator: gen PPL [95% CI] / entropy [T] per row and budget."""
    rows = best_per_budget(points)
    budgets = sorted({p.budget for p in rows})
    out = []
    for evaluator in sorted({p.evaluator for p in rows}):
        info = lm_info.get(evaluator, lm_info)
        note = "" if info.get("comparable_to_published") else " (not comparable with published numbers)"
        n = sorted({p.n_samples for p in rows if p.evaluator == evaluator})
        out += [f"Evaluator `{info.get('name', evaluator)}`{note}: generative perplexity [95% bootstrap interval] / "
                f"unigram entropy, {'/'.join(map(str, n))} samples per point; best step count per budget in "
                "brackets.", "",
                "| model | reuse | schedule | " + " | ".join(f"B{b}" for b in budgets) + " |",
                "|---|---|---|" + "---|" * len(budgets)]
        for row in sorted({p.row for p in rows if p.evaluator == evaluator}):
            cells = []
            for b in budgets:
                hit = [p for p in rows if p.row == row and p.budget == b]
                cells.append(_cell(hit[0]) if hit else "—")
            sched = row[2] + (f", {row[3]}" if row[3] else "")
            out.append(f"| {row[0]} | {row[1]} | {sched} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _cell(p: SweepPoint) -> str:
    if math.isnan(p.gen_ppl):
        return f"diverged [T={p.num_steps}]"
    ci = "" if math.isnan(p.ci95[0]) else f" [{p.ci95[0]:.1f}, {p.ci95[1]:.1f}]"
    passes = "" if p.block_passes >= p.budget - 0.5 else f" ({p.block_passes:.0f} passes)"
    return f"{p.gen_ppl:.1f}{ci} / {p.entropy:.2f} [T={p.num_steps}]{passes}"


def plot(points: list[SweepPoint], path: Path, title: str = "", evaluator: Optional[str] = None) -> Optional[Path]:
    """Quality vs budget (one line per row) for one evaluator, entropy beside it. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [p for p in best_per_budget(points) if evaluator is None or p.evaluator == evaluator]
    if evaluator is None and rows:
        rows = [p for p in rows if p.evaluator == rows[0].evaluator]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in sorted({p.row for p in rows}):
        pts = sorted((p for p in rows if p.row == row), key=lambda p: p.budget)
        label = row[0] + ("" if len({q.row for q in rows if q.model == row[0]}) == 1
                          else f" ({row[1]}, {row[2]}{', ' + row[3] if row[3] else ''})")
        xs, ys = [p.budget for p in pts], [p.gen_ppl for p in pts]
        line = ax1.plot(xs, ys, marker="o", label=label)[0]
        lo, hi = [p.ci95[0] for p in pts], [p.ci95[1] for p in pts]
        if not any(math.isnan(v) for v in lo + hi):
            ax1.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax2.plot(xs, [p.entropy for p in pts], marker="o", label=label)
    for ax, ylabel in ((ax1, "generative perplexity (lower is better)"), (ax2, "unigram entropy (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (transformer-block passes per sample)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if any(p.gen_ppl > 0 for p in rows):  # NaN (diverged) compares False
        ax1.set_yscale("log")
    ax1.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_reports(points: list[SweepPoint], out: Path, lm_info: dict, settings: dict) -> None:
    payload = {"eval_lm": lm_info, "settings": {k: v for k, v in settings.items() if k != "func"},
               "points": [asdict(p) for p in points], "best": [asdict(p) for p in best_per_budget(points)]}
    atomic_text(out / "results.json", json.dumps(payload, indent=2))
    atomic_text(out / "results.md", markdown_table(points, lm_info))
    evaluators = sorted({p.evaluator for p in points})
    for i, evaluator in enumerate(evaluators):
        name = "quality_vs_budget.png" if i == 0 else f"quality_vs_budget_{i}.png"
        plot(points, out / name, title=f"evaluator: {lm_info.get(evaluator, {}).get('name', evaluator)}",
             evaluator=evaluator)


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_points(path: Path) -> list[SweepPoint]:
    """The points of a `results.json`."""
    return [SweepPoint(**p) for p in json.loads(Path(path).read_text())["points"]]
