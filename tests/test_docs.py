"""Docs that run as written: every ```python block of README.md, docs/*.md and conversion/README.md is executed, a
file's blocks in order in one clean process (the Hub offline, model code loaded through `trust_remote_code` from the
saved folders), with tiny models saved under the paths the snippets name."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_evaluation import tiny_tokenizer
from test_images import K
from test_images import tiny_model as tiny_image_model

from fpmgm_hf import VQVAEConfig, VQVAEModel
from fpmgm_hf.images.train import set_image_generation_defaults

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "conversion" / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
TEXT_FOLDERS = ("my-fp-mdlm", "outputs/demo/fp-mdlm")
IMAGE_FOLDERS = ("my-fp-maskgit", "outputs/images/fp_maskgit_4_1_4/final")


def snippets(path: Path) -> str:
    return "\n".join(BLOCK.findall(path.read_text()))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding a tiny model at every path the snippets load from."""
    root = tmp_path_factory.mktemp("docs")
    text = tiny_model(max_position_embeddings=256)
    for name in TEXT_FOLDERS:
        text.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    image = tiny_image_model()
    set_image_generation_defaults(image)
    torch.manual_seed(0)
    vq = VQVAEModel(VQVAEConfig(codebook_size=K, hidden_channels=8, code_dim=4))
    for name in IMAGE_FOLDERS:
        image.save_pretrained(root / name)
        vq.save_pretrained(root / name / "vq")
    # The conversion guide's Hub MDLM, as a local 12-layer plain stack under the same name (no Hub here).
    tiny_model(num_pre_layers=12, num_fp_layers=0, num_post_layers=0).save_pretrained(root / "kuleshov-group" /
                                                                                      "mdlm-owt")
    return root


@pytest.mark.parametrize("doc", [d for d in DOCS if d.is_file() and snippets(d)], ids=lambda d: d.name
                         if d.parent == REPO else f"{d.parent.name}/{d.name}")
def test_every_python_snippet_runs_as_written(doc, workdir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_MODULES_CACHE=str(workdir / "modules"))
    proc = subprocess.run([sys.executable, "-c", snippets(doc)], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{doc.name}:\n{proc.stderr[-4000:]}"
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr  # nothing asks y/N
