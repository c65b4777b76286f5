"""bench/image_eval.py: the accounting behind the image protocol's verdicts (safety-net counts and a point's
status, the accuracy interval, the target lines), on stand-in models so that it runs in milliseconds."""

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import image_eval  # noqa: E402


class FakeModel:
    """Stands in for a class-conditional model: every sample runs two solves; `trip` marks which flags fire."""

    def __init__(self, trip=None):
        self.config = types.SimpleNamespace(num_classes=10)
        self.trip, self.calls = trip or {}, []

    def generate(self, batch_size, class_labels, **kwargs):
        self.calls.append((batch_size, class_labels.clone(), kwargs))
        steps = []
        for i in range(2):
            flags = {f: torch.zeros(batch_size, dtype=torch.bool) for f in ("diverged", "cold_start")}
            for flag, (step, row) in self.trip.items():
                if step == i and row < batch_size:
                    flags[flag][row] = True
            steps.append({"ran": torch.ones(batch_size, dtype=torch.bool), **flags})
        return types.SimpleNamespace(sequences=torch.zeros(batch_size, 49, dtype=torch.long),
                                     block_passes=torch.full((batch_size,), 12), step_stats=steps)


class FakeVQ:
    def __init__(self, nan_row=None):
        self.nan_row = nan_row

    def decode(self, ids):
        images = torch.full((ids.shape[0], 1, 28, 28), 0.5)
        if self.nan_row is not None and self.nan_row < ids.shape[0]:
            images[self.nan_row, 0, 3, 3] = float("nan")
        return images


def test_generate_balances_classes_and_counts_every_solve():
    model = FakeModel()
    images, labels, _, passes, trips = image_eval.generate(model, FakeVQ(), 20, 48, "3sr", 4.0, seed=0)
    assert images.shape == (20, 28, 28) and images.dtype.name == "uint8" and int(images[0, 0, 0]) == 128
    assert labels.tolist() == [i % 10 for i in range(20)] and passes == 12.0
    assert trips == {"diverged": 0, "cold_start": 0, "solves": 40, "nonfinite_images": 0}
    kwargs = model.calls[0][2]
    assert (kwargs["budget"], kwargs["reuse"], kwargs["guidance_scale"]) == (48, "3sr", 4.0)


def test_generate_reports_trips_and_nonfinite_images():
    model = FakeModel(trip={"diverged": (1, 3), "cold_start": (0, 0)})
    images, *_, trips = image_eval.generate(model, FakeVQ(nan_row=2), 10, 48, "3sr", 4.0, seed=0)
    assert trips == {"diverged": 1, "cold_start": 1, "solves": 20, "nonfinite_images": 1}
    assert int(images[2, 3, 3]) == 0  # stored as black, counted above, never a crash in the uint8 cast


@pytest.mark.parametrize("hits,n", [(95, 100), (1902, 2000), (0, 50), (50, 50)])
def test_wilson_endpoints_solve_the_score_equation(hits, n):
    """Wilson's interval is where |p_hat - p| = z * sqrt(p (1 - p) / n): check that, not the formula."""
    p_hat, z = hits / n, 1.96
    lo, hi = image_eval.wilson(p_hat, n)
    assert 0 <= lo <= p_hat <= hi <= 1
    for p in (lo, hi):
        assert abs((p_hat - p) ** 2 - z * z * p * (1 - p) / n) < 1e-12
    if hits == 95:
        assert (round(lo, 4), round(hi, 4)) == (0.8882, 0.9785)  # the textbook value for 95 / 100


def _row(model, reuse, budget, acc, status="ok", n=2000):
    return {"model": model, "reuse": reuse, "budget": budget, "guidance": 4.0, "classifier_accuracy": acc,
            "classifier_accuracy_ci95": image_eval.wilson(acc, n), "fid_classifier": 60.0, "status": status}


def test_targets_judge_each_models_most_accurate_point_and_name_diverged_points():
    rows = [_row("MaskGIT-12", "none", 96, 0.94), _row("MaskGIT-12", "none", 192, 0.951),
            _row("FP-MaskGIT 4/1/4", "3sr", 192, 0.945), _row("FP-MaskGIT 4/1/4", "none", 48, 0.70, "diverged"),
            _row("FP-MaskGIT 4/1/4 + CoFRe", "3sr", 96, 0.90)]
    text = "\n".join(image_eval._targets(rows))
    assert "MaskGIT-12 (none, B192, g 4): 95.1% [94.1, 96.0], meets it." in text
    assert "FP-MaskGIT 4/1/4 (3sr, B192, g 4): 94.5%" in text and "below it, but its interval reaches it" in text
    assert "FP-MaskGIT 4/1/4 + CoFRe (3sr, B96, g 4): 90.0% [88.6, 91.2], below it." in text
    assert "non-finite: FP-MaskGIT 4/1/4 none B48." in text
    table = "\n".join(image_eval._table(types.SimpleNamespace(reuse=["none", "3sr"]), rows))
    assert "| FP-MaskGIT 4/1/4 | none | 4 | 70.0% [68.0, 72.0] **diverged** / 60.0 | — | — |" in table


def test_cost_stage_rotates_the_first_model_and_recomputes_a_cost_file_without_the_24_layer_baseline(tmp_path):
    import json
    from unittest import mock

    (tmp_path / "cost.json").write_text(json.dumps({"MaskGIT-12": {}, "FP-MaskGIT 4/1/4": {}, "ratios": {}}))
    step = {"maskgit-tiny-12": 1.0, "fp-maskgit-tiny": 1.2, "maskgit-tiny-24": 2.0}
    order = []

    def fake_run(cmd, **_):
        preset, report = cmd[3], Path(cmd[-1])
        order.append(preset)
        report.write_text(json.dumps({"median_step_s": step[preset], "peak_rss_mb": 1000 * step[preset],
                                      "training_mb": 500 * step[preset], "params": int(10 * step[preset])}))

    args = types.SimpleNamespace(cost_rounds=3, data="mnist", cost_steps=5, batch_size=8, seed=0)
    with mock.patch.object(image_eval.subprocess, "run", fake_run):
        cost = image_eval.stage_cost(args, tmp_path)
    assert [order[i] for i in (0, 3, 6)] == ["maskgit-tiny-12", "fp-maskgit-tiny", "maskgit-tiny-24"]
    assert cost["ratios_vs"]["MaskGIT-24"]["step_time"] == pytest.approx(0.6)
    assert cost["ratios"]["training_memory"] == pytest.approx(1.2)
    assert cost["ratios_vs"]["MaskGIT-24"]["paper"]["step_time"] == pytest.approx(0.514, abs=1e-3)
    with mock.patch.object(image_eval.subprocess, "run", side_effect=AssertionError("a complete file is reused")):
        assert image_eval.stage_cost(args, tmp_path) == json.loads((tmp_path / "cost.json").read_text())
    payload = {"training": {}, "training_cost": cost}
    text = "\n".join(image_eval._training_lines(payload))
    assert "| MaskGIT-24 | 1.200 vs 2.000 | 0.600 | 0.514 | 600 vs 1000 | 0.600 | 0.493 |" in text
    assert "| MaskGIT-12 | 1.200 vs 1.000 | 1.200 | 1.191 |" in text


def _fake_stages(monkeypatch, launched, evaluated):

    class Proc:
        def __init__(self, cmd, **kwargs):
            launched.append(cmd)
            report = Path(cmd[cmd.index("_train") + 1])
            report.write_text('{"final": "x"}')

        def wait(self):
            return 0

    monkeypatch.setattr(image_eval.subprocess, "Popen", Proc)
    for stage in ("stage_vq", "stage_classifier"):
        monkeypatch.setattr(image_eval, stage, lambda *a: {})
    monkeypatch.setattr(image_eval, "stage_eval", lambda args, out, trains: evaluated.update(trains))


def test_models_subset_trains_and_evaluates_only_the_named_models(tmp_path, monkeypatch):
    launched, evaluated = [], {}
    _fake_stages(monkeypatch, launched, evaluated)
    monkeypatch.setattr(image_eval, "stage_cost", lambda *a: pytest.fail("a subset run has no cost stage"))
    image_eval.main(["--out", str(tmp_path), "--models", "MaskGIT-12", "--parallel"])
    assert len(launched) == 1 and "maskgit-tiny-12" in launched[0] and list(evaluated) == ["MaskGIT-12"]
    with pytest.raises(SystemExit):
        image_eval.parse_args(["--models", "MaskGIT-99"])


def test_trainings_that_share_the_machine_get_one_thread_each(tmp_path, monkeypatch):
    launched, evaluated = [], {}
    _fake_stages(monkeypatch, launched, evaluated)
    monkeypatch.setattr(image_eval, "stage_cost", lambda *a: {})
    image_eval.main(["--out", str(tmp_path), "--parallel", "--threads", "2", "--docs", ""])
    threads = [cmd[cmd.index("--threads") + 1] for cmd in launched]
    assert threads == ["1", "1", "2"] and len(evaluated) == 3  # the two base models side by side, then CoFRe alone


def test_training_time_leaves_out_the_pause_of_a_resumed_run(tmp_path):
    # steps 1 s apart, then a 2-hour stop before the run resumed: 5 steps, 4 gaps of which 3 are training
    times = [0.0, 1.0, 2.0, 7202.0, 7203.0]
    rows = [{"step": 0, "val_ce": 5.5, "event": "start", "time": -1.0}]
    rows += [{"step": i + 1, "loss": 3.0, "time": t} for i, t in enumerate(times)]
    rows += [{"step": 5, "val_ce": 3.4, "time": 7203.5}]
    (tmp_path / "log.jsonl").write_text("\n".join(image_eval.json.dumps(r) for r in rows) + "\n")
    summary = image_eval.log_summary(tmp_path)
    assert summary["steps"] == 5
    assert summary["train_s"] == pytest.approx(3.0)
    assert summary["median_step_s"] == pytest.approx(1.0)
    assert summary["val_ce"] == [5.5, 3.4]


def test_probe_points_cross_reuse_guidance_and_one_axis():
    import image_probe

    args = image_probe.parse_args(["--model", "m", "--tag", "fp", "--json", "r.json", "--iters", "1", "4",
                                   "--reuse", "none", "3sr", "--guidance", "2", "4"])
    points = image_probe._points(args)
    assert len(points) == 8 and len({p[0] for p in points}) == 8
    assert ("fp|3sr|g4|T16k1", "3sr", 4.0, None, 1) in points
    args = image_probe.parse_args(["--model", "m", "--tag", "fp", "--json", "r.json", "--budgets", "192"])
    assert image_probe._points(args) == [("fp|3sr|g4|B192", "3sr", 4.0, 192, None)]
    with pytest.raises(SystemExit):  # a budget and an iteration count are two different axes
        image_probe.parse_args(["--model", "m", "--tag", "fp", "--json", "r.json", "--budgets", "1", "--iters", "2"])


def test_within_class_spread_is_the_mean_per_class_total_variance():
    import numpy as np
    from image_spread import within_class_spread

    # class 0: points (0,0),(2,0) -> unbiased variances 2 and 0; class 1: (0,0),(0,4),(0,8) -> 0 and 16
    feats = np.array([[0, 0], [2, 0], [0, 0], [0, 4], [0, 8], [5, 5]], dtype=float)
    labels = np.array([0, 0, 1, 1, 1, 2])  # class 2 has one sample: no variance, left out
    assert within_class_spread(feats, labels) == pytest.approx((2 + 16) / 2)


def test_report_takes_image_probe_files_and_leaves_other_probe_cells_out(tmp_path):
    import json

    row = {"model": "FP", "classifier_accuracy": 0.95}
    (tmp_path / "training_probe.json").write_text(json.dumps({"FP|3sr|g4|B192": row}))
    (tmp_path / "guidance_probe.json").write_text(json.dumps({"floor": {"classifier": 15.6}, "M|none|96|2": {}}))
    assert image_eval._probes(tmp_path) == {"training_probe": {"FP|3sr|g4|B192": row}}
