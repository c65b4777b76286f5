"""Run code in a fresh interpreter that cannot import fpmgm_hf, so Auto classes must use the saved files."""

import json
import os
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fpmgm_hf" or name.startswith("fpmgm_hf."):
                raise ImportError("fpmgm_hf is blocked in this process")
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import fpmgm_hf  # noqa: F401
        raise SystemExit("blocker failed: fpmgm_hf imported")
    except ImportError:
        pass
    """
)


def run_isolated(code: str, tmp_path, timeout: int = 300) -> dict:
    """Run `code` (which must print one JSON line last) with fpmgm_hf blocked and the Hub offline."""
    # One thread, like the test process (conftest): "identical logits" then means bit-identical.
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        PYTHONPATH="",
    )
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
