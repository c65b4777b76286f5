"""Evaluation tooling: budget sweeps (`sweep`, the `fpmgm-eval` CLI, re-exported here so `fpmgm_hf.evaluation`
keeps its old public names), metrics, the reference LM, fixed-point stability probes and the `evaluate`
modules shipped as package data (`evaluate_module(name)` gives the path for `evaluate.load`)."""

from .sweep import (
    SweepPoint,
    best_per_budget,
    bootstrap_ci,
    build_parser,
    generate_samples,
    main,
    markdown_table,
    plot,
    run_sweep,
    score,
    step_grid,
    write_reports,
)

EVALUATE_MODULES = ("fid", "generative_perplexity", "unigram_entropy")


def evaluate_module(name: str) -> str:
    """The folder of a shipped `evaluate` module, for `evaluate.load(evaluate_module("fid"))`."""
    from importlib.resources import files

    if name not in EVALUATE_MODULES:
        raise ValueError(f"evaluate_module: unknown module {name!r}; valid: {list(EVALUATE_MODULES)}.")
    return str(files(__name__) / "evaluate_modules" / name)


__all__ = ["EVALUATE_MODULES", "SweepPoint", "best_per_budget", "bootstrap_ci", "build_parser", "evaluate_module",
           "generate_samples", "main", "markdown_table", "plot", "run_sweep", "score", "step_grid", "write_reports"]
