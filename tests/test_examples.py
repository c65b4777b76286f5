"""Examples run with tiny arguments (smoke tests)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import MASK, tiny_model
from test_convert import make_assets, reset_accelerate
from test_evaluation import tiny_lm, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def test_generate_text_keeps_prompt_and_suffix(tmp_path):
    import generate_text

    tok = tiny_tokenizer()
    tiny_model().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    argv = ["--model", str(tmp_path / "m"), "--prompt", "w1 w2", "--budget", "24", "--samples", "2"]
    out = generate_text.main(argv + ["--suffix", "w3", "--max-new-tokens", "9"])
    seq = out.sequences
    assert seq.shape == (2, 12) and not (seq == MASK).any()
    assert seq[:, :2].tolist() == [[1, 2], [1, 2]] and seq[:, -1].tolist() == [3, 3]
    assert (out.block_passes <= 24).all()
    long = generate_text.main(argv + ["--max-new-tokens", "80", "--block-length", "16", "--steps", "2"])
    assert long.sequences.shape == (2, 82) and long.num_blocks == 5 and not (long.sequences == MASK).any()
    assert (long.block_passes <= 5 * 24).all()  # the budget is per block


def test_generate_text_streams_one_sample_and_refuses_an_empty_gap(tmp_path, capsys):
    import generate_text

    tok = tiny_tokenizer()
    tiny_model().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = generate_text.main(["--model", str(tmp_path / "m"), "--prompt", "w1", "--max-new-tokens", "4",
                              "--samples", "1", "--stream", "--steps", "2"])
    assert tok.decode(out.sequences[0, 1:]) in capsys.readouterr().out  # the final text stays on screen
    with pytest.raises(ValueError, match="--max-new-tokens"):
        generate_text.build_canvas(tok, "w1 w2 w3", "w4", 0)
    assert generate_text.build_canvas(tok, "w1", "", 2).tolist() == [[1, MASK, MASK]]
    assert generate_text.build_canvas(tok, "w1", "w2", 1).tolist() == [[1, MASK, 2]]


def test_budget_sweep_scores_every_budget_and_reuse_mode(tmp_path):
    import budget_sweep

    tiny_model().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    rows = budget_sweep.main(["--model", str(tmp_path / "m"), "--budgets", "12", "24", "--reuse", "none", "3sr",
                              "--samples", "2", "--length", "8", "--eval-lm", str(tiny_lm(tmp_path / "lm"))])
    assert [(r["budget"], r["reuse"]) for r in rows] == [(12, "none"), (12, "3sr"), (24, "none"), (24, "3sr")]
    assert all(0 < r["block_passes"] <= r["budget"] and r["gen_ppl"] > 1 and r["entropy"] >= 0 for r in rows)


def test_train_own_text_trains_both_stages_and_reuses_them(tmp_path):
    import train_own_text

    text = tmp_path / "mine.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    argv = ["--text", str(text), "--out", str(tmp_path / "run"), "--vocab-size", "300", "--hidden-size", "32",
            "--seq-len", "16", "--steps", "4", "--cons-steps", "2", "--batch-size", "2"]
    final = train_own_text.main(argv)
    assert final == tmp_path / "run" / "cofre" / "final"
    from transformers import AutoModel

    model = AutoModel.from_pretrained(final, trust_remote_code=True)
    assert model.config.num_fp_layers == 1 and model.config.vocab_size == 300
    assert model.generation_config.reuse == "3sr"
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    assert train_own_text.main(argv) == final and (final / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def mdlm(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("mdlm"))


def _tiny_convert_args(assets):
    return ["--mdlm", str(assets["mdlm"]), "--tokenizer", str(assets["tok"]), "--data", str(assets["data"]),
            "--seq-len", "16", "--verify-batch", "2", "--sample-length", "8", "--sample-steps", "2",
            "--val-blocks", "4", "--eval-batches", "2"]


def test_lora_conversion_example_reports_the_adapters(mdlm, tmp_path):
    import lora_conversion

    report = lora_conversion.main(_tiny_convert_args(mdlm) + [
        "--map", "1,2,3", "--rank", "2", "--steps", "2", "--launcher", "python", "--output", str(tmp_path / "lora"),
        "--batch-size", "2", "--eval-every", "0"])
    params = report["finetune"]["parameters"]
    assert report["finetune"]["lora_r"] == 2 and params["trainable_parameters"] < params["total_parameters"] / 5
    assert (tmp_path / "lora" / "model.safetensors").is_file()


def test_convert_mdlm_owt_example_runs_the_recipe_on_a_tiny_checkpoint(mdlm, tmp_path):
    import convert_mdlm_owt

    out = tmp_path / "owt"
    argv = _tiny_convert_args(mdlm) + ["--map", "1,2,3", "--steps", "2", "--batch-size", "2", "--global-batch", "4",
                                         "--consistency-steps", "2", "--output", str(out)]
    reset_accelerate()
    convert_mdlm_owt.main(argv)
    report = json.loads((out / "conversion.json").read_text())
    assert report["mapping"] == [1, 2, 3]
    assert report["training"]["grad_accum"] == 2 and report["training"]["steps"] == 2
    from fpmgm_hf import FPMGMForMaskedGeneration

    assert FPMGMForMaskedGeneration.from_pretrained(str(out)).generation_config.reuse == "3sr"
    reset_accelerate()
    with pytest.raises(ValueError, match="--global-batch 5"):
        convert_mdlm_owt.main(argv[:-2] + ["--global-batch", "5", "--output", str(tmp_path / "x")])


def test_generate_images_writes_one_column_per_class(tmp_path):
    import generate_images
    from test_images import NUM_CLASSES, K
    from test_images import tiny_model as tiny_image_model

    from fpmgm_hf import VQVAEConfig, VQVAEModel

    tiny_image_model().save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    VQVAEModel(VQVAEConfig(codebook_size=K, hidden_channels=8, code_dim=4)).save_pretrained(tmp_path / "m" / "vq")
    out = generate_images.main(["--model", str(tmp_path / "m"), "--rows", "2", "--budget", "12",
                                "--out", str(tmp_path / "grid.png")])
    data = Path(out).read_bytes()
    assert data.startswith(b"\x89PNG")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    import numpy as np

    expected = generate_images.tile(np.zeros((2 * NUM_CLASSES, 28, 28), np.uint8), cols=NUM_CLASSES).shape
    assert (height, width) == expected  # one column per class, --rows rows of 28x28 images


def test_demo_verdict_states_the_direction_only_where_intervals_separate(tmp_path):
    from dataclasses import asdict

    import demo  # examples/ is on sys.path (top of this file)

    from fpmgm_hf.evaluation.sweep_report import SweepPoint

    def point(model, reuse, budget, ppl, ci, evaluator="in-domain"):
        return asdict(SweepPoint(model=model, reuse=reuse, fp_schedule="decreasing", budget=budget, num_steps=4,
                                 gen_ppl=ppl, pooled_ppl=ppl, entropy=4.0, block_passes=budget, seconds=1.0,
                                 evaluator=evaluator, ci95=ci))

    points = [point("MDLM (6 layers)", "none", 24, 30.0, [28.0, 32.0]),
              point("converted FP-MDLM (1/1/1)", "none", 24, 22.0, [21.0, 23.0]),  # wins
              point("converted FP-MDLM (1/1/1)", "3sr", 24, 26.0, [25.0, 27.0]),  # not its best point
              point("MDLM (6 layers)", "none", 96, 20.0, [19.0, 21.0]),
              point("converted FP-MDLM (1/1/1)", "3sr", 96, 20.5, [19.5, 21.5]),  # tie
              point("MDLM (6 layers)", "none", 96, 10.0, [9.0, 11.0], evaluator="general"),
              point("converted FP-MDLM (1/1/1)", "none", 96, 14.0, [13.0, 15.0], evaluator="general")]  # loses
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text(json.dumps({"points": points}))
    rows = [line for line in demo.verdict_section(tmp_path) if line.startswith("| ") and "budget" not in line]
    verdicts = {(r.split("|")[1].strip(), int(r.split("|")[2])): r.split("|")[-2].strip() for r in rows}
    assert verdicts == {("in-domain", 24): "wins", ("in-domain", 96): "tie", ("general", 96): "loses"}
    assert "22.0 [21.0, 23.0] (none) | 0.73" in next(r for r in rows if "| 24 |" in r)
