"""bench/run_all.py: runs the chosen benchmarks in subprocesses and writes one report, failures included."""

import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_run_all_writes_the_report_and_flags_failures(tmp_path):
    import run_all

    out = tmp_path / "RESULTS.md"
    assert run_all.main(["--only", "params", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python bench/param_count.py" in text and "logical CPUs" in text
    assert "MDLM 12/0/0" in text and "169,627,218" in text  # the measured count, not a placeholder

    broken = [("params", "A benchmark that crashes", ["-c", "import sys; sys.exit('boom')"])]
    with mock.patch.object(run_all, "benches", return_value=broken):
        assert run_all.main(["--out", str(out)]) == 1
    assert "FAILED (exit 1)" in out.read_text() and "boom" in out.read_text()


def test_reproduction_report_lists_stages_curves_and_findings(tmp_path):
    import json

    import reproduce_text

    out, docs = tmp_path / "repro", tmp_path / "docs"
    (out / "mdlm").mkdir(parents=True)
    docs.mkdir()
    (out / "results.md").write_text("| model | B96 |\n|---|---|\n| MDLM | 3790.2 / 4.28 [T=8] |\n")
    (out / "quality_vs_budget.png").write_bytes(b"\x89PNG fake")
    (out / "mdlm" / "log.jsonl").write_text("".join(json.dumps({"step": s, "val_ppl": v}) + "\n"
                                                    for s, v in [(0, 3887.0), (150, 648.0), (300, 602.0)]))
    stages = [{"stage": "mdlm", "cmd": ["python", "-m", "fpmgm_hf.train"], "seconds": 3560, "note": "stopped early"},
              {"stage": "cons", "cmd": ["python", "x"], "seconds": 34, "returncode": 1}]
    (out / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (docs / "findings.md").write_text("## Findings\n\nhand-written\n")
    reproduce_text.write_report(out, docs)
    text = (docs / "README.md").read_text()
    assert "| MDLM | 3790.2 / 4.28 [T=8] |" in text and (docs / "quality_vs_budget.png").exists()
    assert "3887 (step 0) → 648 (step 150) → 602 (step 300) |" in text  # last point not repeated
    assert "| mdlm (stopped early) | 3560 |" in text and "| cons (failed; rerun below) | 34 |" in text
    assert text.rstrip().endswith("hand-written")
