"""Tokenisation throughput of the data path (`fpmgm_hf.data.pipeline`) on a ~100 MB text file, 1 vs 2 processes.

    OMP_NUM_THREADS=1 python bench/tokenize_throughput.py --size-mb 100 --out-dir outputs/bench_tokenize

The file is the bundled corpora's documents (Shakespeare, then the KJV, 32 lines each) separated by blank lines,
repeated up to `--size-mb`; it is built once and reused. Each `--procs` run loads it into a fresh `datasets` cache
and times the batched tokenising `map` alone (GPT-2 BPE, offline asset), so it measures tokenisation, not the cache;
the last run is then repeated on its warm cache. Prints a markdown table and writes `results.json`.
`TOKENIZERS_PARALLELISM` defaults to false here so that one process means one core (Rust threads off).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_corpus(path: Path, size_mb: float) -> Path:
    """A text file of at least `size_mb` MB: the bundled documents, blank-line separated, repeated."""
    from fpmgm_hf.data import load_texts
    from fpmgm_hf.data.assets import atomic_write

    target = int(size_mb * 1e6)
    if path.is_file() and path.stat().st_size >= target:
        return path
    unit = "\n\n".join(load_texts("shakespeare") + load_texts("kjv")) + "\n\n"
    with atomic_write(path, "w") as f:
        written = 0
        while written < target:
            f.write(unit)
            written += len(unit.encode("utf-8"))
    return path


def _tokens(tokenized) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py())


def timed_run(path: Path, tokenizer, num_proc: int, cache_dir: str) -> tuple[dict, object]:
    from fpmgm_hf.data import load_documents, tokenize_documents

    docs = load_documents(str(path), cache_dir=cache_dir)
    start = time.perf_counter()
    tokenized = tokenize_documents(docs, tokenizer, num_proc=num_proc)
    seconds = time.perf_counter() - start
    return {"processes": num_proc, "documents": len(docs), "tokens": _tokens(tokenized), "seconds": seconds}, docs


def table(rows: list[dict], mb: float) -> str:
    base = next((r["seconds"] for r in rows if r["processes"] == 1 and not r["cached"]), None)
    lines = ["| run | processes | MB | documents | tokens | seconds | MB/s | tokens/s | speed-up vs 1 process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{base / r['seconds']:.2f}" if base and not r["cached"] else "-"
        lines.append(f"| {'cached re-run' if r['cached'] else 'fresh cache'} | {r['processes']} | {mb:.1f} | "
                     f"{r['documents']:,} | {r['tokens']:,} | {r['seconds']:.2f} | {mb / r['seconds']:.1f} | "
                     f"{r['tokens'] / r['seconds']:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=100.0, help="size of the text file")
    p.add_argument("--out-dir", default="outputs/bench_tokenize", help="where the file and results.json go")
    p.add_argument("--procs", default="1,2", help="comma-separated num_proc values")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer name or folder")
    p.add_argument("--tokenizers-parallelism", default="false", help="TOKENIZERS_PARALLELISM for the runs")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", args.tokenizers_parallelism)
    from fpmgm_hf.data import load_training_tokenizer
    from fpmgm_hf.data.assets import atomic_write

    out = Path(args.out_dir)
    path = build_corpus(out / f"corpus_{args.size_mb:g}mb.txt", args.size_mb)
    mb = path.stat().st_size / 1e6
    tokenizer = load_training_tokenizer(args.tokenizer)
    rows, caches = [], []
    try:
        for num_proc in (int(x) for x in args.procs.split(",")):
            caches.append(tempfile.mkdtemp(prefix="hf-cache-", dir=out))  # fresh: nothing to reuse
            row, _ = timed_run(path, tokenizer, num_proc, caches[-1])
            rows.append(dict(row, cached=False))
        row, _ = timed_run(path, tokenizer, rows[-1]["processes"], caches[-1])  # the same cache, warm
        rows.append(dict(row, cached=True))
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
    text = table(rows, mb)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}"
    print(f"{path} ({mb:.1f} MB), tokenizer {args.tokenizer}, TOKENIZERS_PARALLELISM="
          f"{os.environ['TOKENIZERS_PARALLELISM']}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {machine}\n")
    print(text)
    with atomic_write(out / "results.json", "w") as f:
        json.dump({"file": str(path), "mb": mb, "machine": machine, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
