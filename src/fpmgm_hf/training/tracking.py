"""Experiment tracking through Accelerate: the run's `log.jsonl` is one Accelerate tracker among the others
(`--report-to tensorboard,wandb,...`), so every record goes through `accelerator.log`.

`log.jsonl` holds one JSON object per line: the record as logged (`step`, `loss`, `lr`, ... for a training
step; `val_nelbo`, `val_ppl`, ... for an evaluation; `event` for resume / early stop / start markers) plus
`time` (Unix seconds). It describes the run that produced the current state of the output folder: resuming
from step N drops the records of steps after N (an interrupted run logged them; they are re-run and logged
again), and a fresh start moves an earlier log aside to `log.jsonl.prev`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from accelerate.tracking import GeneralTracker, get_available_trackers
from accelerate.utils import LoggerType

LOG_NAME = "log.jsonl"
TRACKER_CHOICES = sorted(str(t) for t in LoggerType if str(t) != "all")


class JSONLTracker(GeneralTracker):
    """An Accelerate tracker writing `folder/log.jsonl` (main process only, like every Accelerate tracker).

    `resume_step`: None for a fresh run (an existing log is moved to `log.jsonl.prev`), else the step the run
    continues from (records with a larger `step` are dropped, atomically)."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, folder: str, resume_step: Optional[int] = None):
        super().__init__()
        self.path = os.path.join(folder, LOG_NAME)
        self.resume_step = resume_step

    @property
    def tracker(self):
        return self.path

    def start(self):
        if not os.path.isfile(self.path):
            return
        if self.resume_step is None:
            os.replace(self.path, self.path + ".prev")
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if _step(line) is None or _step(line) <= self.resume_step]
        if len(kept) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def store_init_configuration(self, values: dict):
        pass  # the settings live in the checkpoints' trainer_state.json and the exported card

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({**values, "time": round(time.time(), 3)}) + "\n")


def _step(line: str) -> Optional[int]:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def parse_report_to(spec: Optional[str]) -> list[str]:
    """`--report-to`: comma-separated Accelerate tracker names, or 'none'; default (None): tensorboard when it is
    installed. A named tracker that is not installed is an error naming it."""
    available = {str(t) for t in get_available_trackers()}
    if spec is None:
        return ["tensorboard"] if "tensorboard" in available else []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in TRACKER_CHOICES]
    if bad:
        raise ValueError(f"--report-to: unknown tracker(s) {bad}; valid: {TRACKER_CHOICES + ['none']} "
                         "(the JSONL log is always written).")
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"--report-to: {missing} not installed (pip install {' '.join(missing)}), or drop it.")
    return names


def start_trackers(accelerator, folder: str, *, run_name: str, config: dict,
                   resume_step: Optional[int] = None) -> None:
    """(Re)start the accelerator's trackers for the run in `folder`: the JSONL log plus the trackers given to
    `Accelerator(log_with=...)`; file-based ones (tensorboard, ...) write under `folder/logs/<run_name>`. Called
    once per run (the converter calls it once per stage, each stage with its own folder)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    others = [t for t in accelerator.log_with if not isinstance(t, JSONLTracker)]
    accelerator.trackers = []
    accelerator.project_configuration.set_directories(folder)
    accelerator.project_configuration.logging_dir = os.path.join(folder, "logs")
    accelerator.log_with = [JSONLTracker(folder, resume_step), *others]
    init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
    accelerator.init_trackers(run_name, config=_flat(config), init_kwargs=init_kwargs)


def _flat(config: dict) -> dict:
    """Tracker configs take scalars only: nested values become strings."""
    return {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for k, v in config.items()}
