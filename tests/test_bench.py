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
