"""The reliability table of docs/reliability.md: each test that tries a bad input records one row (what it tried,
how many cases, how many went wrong, what the input got). Rows go to the JSONL file named by
$FPMGM_RELIABILITY_ROWS; without it recording does nothing. Regenerate the table with

    python tests/reliability_table.py        # runs the recording tests, then rewrites docs/reliability.md
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS_ENV = "FPMGM_RELIABILITY_ROWS"
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
TEST_FILES = ["tests/test_reliability.py", "tests/test_config_fuzz.py", "tests/test_resume_state.py",
              "tests/test_security.py", "tests/test_integrity.py", "tests/test_runlock.py",
              "tests/test_mdlm_checkpoint_safety.py"]
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"
# A test's tmp folder (pytest's or tempfile's), shortened to ".../".
_TMP = re.compile(r"(?:/private)?/tmp/(?:pytest-of-[^/]+/pytest-\d+/)?[^/\s'\"]+/")


def short(message: str, limit: int = 220) -> str:
    """The first two lines of an error message (the second usually names the tensor or file), tmp paths
    shortened, at most `limit` characters."""
    lines = [line.strip() for line in str(message).strip().splitlines()[:2]]
    text = _TMP.sub(".../", " ".join(lines)).replace(str(REPO) + "/", "")  # no machine paths in the table
    text = re.sub(r"\S*/site-packages/", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record(area: str, case: str, got: str, tried: int = 1, failures: int = 0) -> None:
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"area": area, "case": case, "tried": tried, "failures": failures,
                                "got": got}) + "\n")


def expect_error(area: str, case: str, fn, error=Exception, match: str = ""):
    """Call `fn`; it must raise `error` with a message matching `match` (regex). Records the row, then asserts;
    returns the exception."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the row records whatever happened
        ok = isinstance(err, error) and re.search(match, str(err)) is not None
        record(area, case, f"{type(err).__name__}: {short(err)}", failures=0 if ok else 1)
        assert isinstance(err, error), f"{case}: expected {error.__name__}, got {type(err).__name__}: {err}"
        assert re.search(match, str(err)), f"{case}: {match!r} not in: {err}"
        return err
    record(area, case, "no error (wrong)", failures=1)
    raise AssertionError(f"{case}: no error raised")


def render(rows: list[dict]) -> str:
    lines = ["| area | bad input / case | cases tried | failures | what it gets |", "|---|---|---|---|---|"]
    for r in rows:
        got = r["got"].replace("|", "\\|")
        lines.append(f"| {r['area']} | {r['case']} | {r['tried']} | {r['failures']} | {got} |")
    tried, failures = sum(r["tried"] for r in rows), sum(r["failures"] for r in rows)
    lines += ["", f"{len(rows)} rows, {tried} cases tried, {failures} failures."]
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        env = dict(os.environ, **{ROWS_ENV: str(rows_file)})
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES],
                              cwd=REPO, env=env, capture_output=True, text=True)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    order = {"security": 0, "integrity": 1, "atomic save": 2, "importer": 3, "locks": 4, "fuzz": 5}
    rows.sort(key=lambda r: (order.get(r["area"], 9), r["area"]))
    table = render(rows) + f"\n\npytest: {summary} ({time.time() - t0:.0f} s)"
    text = DOC.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    DOC.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    print(table)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
