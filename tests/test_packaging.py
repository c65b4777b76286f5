"""The distribution and the layout: a wheel built from the repository is complete (card templates, the
converter with its `fpmgm-convert` entry point, the `evaluate` modules with README and requirements, LICENSE)
and works from a temporary install; the tooling lives in subpackages by job; no import circles; the
Hub-portable model files stay flat and self-contained."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "fpmgm_hf"
HUB_FILES = ("configuration_fpmgm", "modeling_fpmgm", "fixed_point_fpmgm", "generation_fpmgm",
             "generation_config_fpmgm", "canvas_fpmgm", "streaming_fpmgm", "pipeline_fpmgm", "scheduling_fpmgm",
             "solver_fpmgm", "validation_fpmgm", "configuration_vqvae", "modeling_vqvae", "layers_fpmgm", "loss_fpmgm",
             "generation_inputs_fpmgm")


def _env(**extra) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, built from a copy of the sources with setuptools' PEP 517 backend and installed (no
    dependencies: they are this environment's) into a temporary target."""
    root = tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(PKG, root / "src" / "fpmgm_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    backend = "from setuptools import build_meta as b; print(b.build_wheel('dist'))"
    build = subprocess.run([sys.executable, "-c", backend], cwd=root, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = root / "dist" / build.stdout.strip().splitlines()[-1]
    target = root / "target"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return wheel, target


def test_wheel_holds_templates_converter_metrics_and_license(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fpmgm_hf/hub/templates/text.md", "fpmgm_hf/hub/templates/image.md",
            "fpmgm_hf/conversion/convert.py", "fpmgm_hf/conversion/mdlm_import.py"} <= names
    for metric in ("fid", "generative_perplexity", "unigram_entropy"):
        assert {f"fpmgm_hf/evaluation/evaluate_modules/{metric}/{f}"
                for f in (f"{metric}.py", "README.md", "requirements.txt")} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fpmgm-convert = fpmgm_hf.conversion.convert:main" in scripts and "fpmgm-train" in scripts


def test_installed_wheel_renders_a_card_and_runs_fpmgm_convert(installed):
    _, target = installed
    env = _env(PYTHONPATH=str(target))
    code = (
        "import fpmgm_hf, torch\n"
        "from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration, load_mdlm_checkpoint\n"
        "from fpmgm_hf.evaluation import evaluate_module\n"
        "from fpmgm_hf.hub import render_model_card\n"
        "import os\n"
        f"assert fpmgm_hf.__file__.startswith({str(target)!r}), fpmgm_hf.__file__\n"
        "m = FPMGMForMaskedGeneration(FPMGMConfig(vocab_size=40, mask_token_id=39, hidden_size=32,\n"
        "    num_attention_heads=4, cond_dim=16, max_position_embeddings=64))\n"
        "card = str(render_model_card(m, repo_id='me/tiny', base_model='kuleshov-group/mdlm-owt'))\n"
        "assert 'base_model: kuleshov-group/mdlm-owt' in card and 'me/tiny' in card, card[:500]\n"
        "assert all(os.path.isfile(os.path.join(evaluate_module('fid'), f)) for f in ('fid.py', 'README.md'))\n"
        "print('ok', callable(load_mdlm_checkpoint))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok True" in proc.stdout, proc.stderr[-3000:]
    for script, flag in (("fpmgm-convert", "--keep-adapter"), ("fpmgm-train", "--save-total-limit")):
        run = subprocess.run([str(target / "bin" / script), "--help"], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0 and flag in run.stdout, run.stderr[-3000:]


def test_top_level_holds_only_the_hub_portable_files():
    """Tooling lives in subpackages by job; the flat files are the ones that ship beside the weights."""
    flat = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert flat == set(HUB_FILES), sorted(flat ^ set(HUB_FILES))
    for job in ("training", "conversion", "evaluation", "images", "data", "hub", "demo"):
        assert (PKG / job / "__init__.py").is_file(), job


def test_python_m_entry_points_run():
    for module in ("fpmgm_hf.training.train", "fpmgm_hf.images.train", "fpmgm_hf.evaluation",
                   "fpmgm_hf.evaluation.stability", "fpmgm_hf.conversion.convert"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout, (module, proc.stderr[-2000:])


def test_repository_script_is_the_packaged_converter():
    proc = subprocess.run([sys.executable, str(REPO / "conversion" / "convert.py"), "--help"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "fpmgm-convert" in proc.stdout and "--keep-adapter" in proc.stdout


# ------------------------------------------------------------------------------------------------- layout


def _imports(path: Path, module: str, toplevel_only: bool) -> set[str]:
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if toplevel_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            if node.level:
                target = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            else:
                target = node.module.split(".")
            found.add(".".join(target))
            found.update(".".join(target + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _graph(toplevel_only: bool) -> dict[str, set[str]]:
    files = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {m: {d for d in _imports(p, m, toplevel_only) if d in files and d != m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])
    return found


def test_no_import_circles():
    assert _cycles(_graph(toplevel_only=True)) == []
    # Counting imports inside functions too, the only circle left runs through the Hub-portable files
    # (generation -> pipeline -> modeling, deferred), none through the tooling.
    hub = {f"fpmgm_hf.{m}" for m in HUB_FILES}
    assert all(set(c) <= hub for c in _cycles(_graph(toplevel_only=False)))


def test_hub_files_stay_flat_and_import_only_torch_transformers_stdlib_and_each_other():
    """Module-level imports (optional ones, such as PIL for images, are deferred into functions)."""
    allowed = {"torch", "transformers", "safetensors"} | set(sys.stdlib_module_names)
    for name in HUB_FILES:
        path = PKG / f"{name}.py"
        assert path.is_file(), name
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and (node.module or "") in HUB_FILES, (name, node.module)
        for node in tree.body:
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, (name, node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                assert node.module.split(".")[0] in allowed, (name, node.module)
