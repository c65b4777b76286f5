"""The Accelerate configs shipped for scaling out (conversion/accelerate/*.yaml) and an FSDP2 smoke test with two
CPU processes (tests/fsdp_smoke.py): sharded gradients, weights and the exported folder match one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "conversion" / "accelerate"


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    from fpmgm_hf import FPMGMForMaskedGeneration

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if kind == "FSDP":
        wrap = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert wrap in FPMGMForMaskedGeneration._no_split_modules and config.fsdp_config["fsdp_version"] == 2


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_fsdp2_on_two_cpu_processes_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "fsdp_smoke.py"), str(tmp_path / "final")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(re.findall(r"(\w+)=([0-9.e+-]+)", proc.stdout))
    assert float(found["grad_norm"]) > 0.1, proc.stdout  # a real step, not an all-zero gradient
    for key in ("grad_err", "weight_err", "logit_err"):
        assert float(found[key]) <= 1e-5, (key, proc.stdout)
    assert (tmp_path / "final" / "config.json").is_file()
