"""The training entry point on a tiny char-level tokenizer and a tiny local text file."""

import json
import math
import os
import random
import subprocess
import sys
import types

import pytest
import torch
from conftest import tiny_config

from fpmgm_hf import FPMGMForMaskedGeneration
from fpmgm_hf.training.train import Trainer, check_resume, main

WORDS = "the quick brown fox jumps over a lazy dog while seven wild owls hoot".split()
TINY = dict(hidden_size=32, num_attention_heads=4, cond_dim=16, dropout=0.0, max_position_embeddings=64,
            num_pre_layers=1, num_fp_layers=1, num_post_layers=1, fp_train_nograd_iters=[0, 1],
            fp_train_grad_iters=[1, 2], fp_max_iter=2)


def reset_accelerate():
    """Accelerate keeps process-wide singletons; each in-process `main()` must start from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_char_tokenizer(path, text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1}
    for ch in sorted(set(text)):
        vocab.setdefault(ch, len(vocab))
    vocab["[MASK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", mask_token="[MASK]")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(120)]
    (root / "data.txt").write_text("\n".join(lines) + "\n")
    tok = make_char_tokenizer(str(root / "tok"), " ".join(WORDS))
    (root / "tiny.json").write_text(json.dumps(TINY))
    return types.SimpleNamespace(root=root, data=str(root / "data.txt"), tok=str(root / "tok"),
                                 config=str(root / "tiny.json"), vocab=len(tok))


def base_args(assets, out, **extra):
    args = {"--data": assets.data, "--tokenizer": assets.tok, "--config": assets.config, "--out": str(out),
            "--seq-len": "24", "--batch-size": "4", "--warmup-steps": "2", "--eval-every": "2",
            "--eval-batches": "2", "--save-every": "2", "--seed": "3"}
    args.update({k: str(v) for k, v in extra.items()})
    return [x for kv in args.items() for x in kv if x is not None]


def run(argv):
    reset_accelerate()
    return main(argv)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


# ------------------------------------------------------------------------------------------- resume


def test_resume_reproduces_uninterrupted_run(assets, tmp_path):
    extra = {"--grad-accum": 2, "--ema": 0.9}
    full = tmp_path / "full"
    run(base_args(assets, full, **{"--max-steps": 4}, **extra))
    part = tmp_path / "part"
    run(base_args(assets, part, **{"--max-steps": 2}, **extra))
    assert sorted(os.listdir(part / "checkpoints")) == ["step_2"]  # the temp folder was renamed away
    run(base_args(assets, part, **{"--max-steps": 4, "--resume": "latest"}, **extra))

    assert losses(full)[3] == losses(part)[3] and losses(full)[4] == losses(part)[4]
    evals = lambda out: [r["val_nelbo"] for r in read_log(out) if "val_nelbo" in r]  # noqa: E731
    assert evals(full) == evals(part)
    a = FPMGMForMaskedGeneration.from_pretrained(str(full / "final")).state_dict()
    b = FPMGMForMaskedGeneration.from_pretrained(str(part / "final")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((part / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 8


def test_resume_rejects_incompatible_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    run(base_args(assets, out, **{"--max-steps": 2}))
    with pytest.raises(ValueError, match="seq_len: checkpoint 24 vs this run 16"):
        run(base_args(assets, out, **{"--max-steps": 4, "--resume": "latest", "--seq-len": 16}))
    with pytest.raises(ValueError, match="does not exist"):
        run(base_args(assets, out, **{"--max-steps": 4, "--resume": str(tmp_path / "nope")}))


# -------------------------------------------------------------------------------------- bad inputs


def test_config_vocab_mismatch_names_both_values(assets, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(TINY, vocab_size=999, mask_token_id=998)))
    with pytest.raises(ValueError, match=f"vocab_size=999 but the tokenizer has vocab_size={assets.vocab}"):
        run(base_args(assets, tmp_path / "o", **{"--config": bad, "--max-steps": 1}))


def test_missing_and_empty_data(assets, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        run(base_args(assets, tmp_path / "o", **{"--data": tmp_path / "missing.txt", "--max-steps": 1}))
    with pytest.raises(ValueError, match="does not exist"):
        run(base_args(assets, tmp_path / "o", **{"--tokenizer": tmp_path / "no_tok", "--max-steps": 1}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty|no text"):
        run(base_args(assets, tmp_path / "o", **{"--data": empty, "--max-steps": 1}))


def test_jsonl_data_and_export(assets, tmp_path):
    lines = (assets.root / "data.txt").read_text().splitlines()
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(lines)))
    final = run(base_args(assets, tmp_path / "o", **{"--data": jsonl, "--max-steps": 2, "--save-every": 0}))
    model = FPMGMForMaskedGeneration.from_pretrained(final)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tok) and model.config.mask_token_id == tok.mask_token_id
    assert not os.path.exists(tmp_path / "o" / "checkpoints")
    # How the blocks were framed and which were held out, for the converter (no machine paths)
    from fpmgm_hf.data import read_data_record

    record = read_data_record(final)
    assert record["data"] == "data.jsonl" and record["wrap"] == "none" and record["val_fraction"] == 0.05
    assert record["heldout_blocks"] >= 1 and len(record["heldout_fingerprint"]) == 16


# ------------------------------------------------------------------------------------- consistency


def test_consistency_stage_logs_baseline_entropy_and_lambda(assets, tmp_path):
    base = run(base_args(assets, tmp_path / "base", **{"--max-steps": 2, "--save-every": 0}))
    out = tmp_path / "cofre"
    argv = base_args(assets, out, **{"--max-steps": 4, "--consistency-weight": 0.1, "--consistency-warmup": 2,
                                     "--stop-ppl-rise": 0.15, "--sample-steps": 2})
    argv = [x for x in argv if x not in ("--config", assets.config, "--tokenizer", assets.tok)]
    run(argv + ["--from", base])
    log = read_log(out)
    assert log[0]["event"] == "pre_stage" and log[0]["step"] == 0
    assert all("sample_entropy" in r for r in log if "val_nelbo" in r)
    assert [r["lambda"] for r in log if "lambda" in r] == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_early_stop_rule():
    fake = types.SimpleNamespace(args=types.SimpleNamespace(stop_ppl_rise=0.15, consistency_weight=0.1),
                                 baseline_ppl=10.0, stopped=False, step=7, logged=[])
    fake.log = fake.logged.append
    Trainer.check_stop(fake, {"val_ppl": 11.4})
    assert not fake.stopped
    Trainer.check_stop(fake, {"val_ppl": 11.6})
    assert fake.stopped and fake.logged[0]["event"] == "early_stop"


def test_check_resume_lists_every_mismatch():
    current = {"seq_len": 8, "batch_size": 2, "grad_accum": 1, "num_processes": 1, "seed": 0, "train_blocks": 5,
               "data_fingerprint": "x", "vocab_size": 10, "mask_token_id": 9, "consistency_weight": 0.0,
               "eps": 1e-3, "model_config": {"hidden_size": 32}}
    saved = dict(current, batch_size=4, model_config={"hidden_size": 64})
    with pytest.raises(ValueError, match="batch_size: checkpoint 4 vs this run 2.*model hidden_size"):
        check_resume(saved, current, "ckpt")


# ---------------------------------------------------------------------------------------- processes


def test_two_process_smoke(assets, tmp_path):
    """Two CPU processes under torchrun (gloo DDP). Note: `accelerate launch --cpu --num_processes 2` starts
    only one process unless MPI is installed, and accelerate's fork-based `debug_launcher` can hang after
    the parent has used OpenMP threads, so the test uses torchrun."""
    out = tmp_path / "ddp"
    argv = base_args(assets, out, **{"--max-steps": 3, "--batch-size": 2})
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fpmgm_hf.training.train", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "checksums.json"} <= set(os.listdir(ckpt))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]
    assert os.path.isfile(out / "final" / "config.json")


def test_two_processes_follow_the_single_process_curve(assets, tmp_path):
    """Same global batch (2 x 4 blocks vs 1 x 8; the sampler hands both runs the same blocks), different
    noise draws per rank: validation NELBO along the run must agree within a loose tolerance."""
    common = {"--max-steps": 16, "--eval-every": 8, "--save-every": 0, "--lr": "3e-3", "--eval-batches": 0}
    one, two = tmp_path / "one", tmp_path / "two"
    run(base_args(assets, one, **common, **{"--batch-size": 8}))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fpmgm_hf.training.train", *base_args(assets, two, **common, **{"--batch-size": 4})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = lambda out: {r["step"]: r["val_nelbo"] for r in read_log(out) if "val_nelbo" in r}  # noqa: E731
    a, b = val(one), val(two)
    assert sorted(a) == sorted(b) == [0, 8, 16]
    assert a[16] < a[0] - 0.1 and b[16] < b[0] - 0.1, (a, b)  # both learn
    for step in (8, 16):
        assert abs(a[step] - b[step]) < 0.1 * a[step], (step, a[step], b[step])


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_training_on_shakespeare_lowers_validation_nelbo(tmp_path):
    """A tiny FP-MDLM on Shakespeare (char-level tokenizer) for a few hundred steps."""
    pytest.importorskip("fpmgm_hf.data.assets")
    from fpmgm_hf.data.assets import load_text_corpus

    chars = set().union(*map(set, load_text_corpus("shakespeare")))
    tok = make_char_tokenizer(str(tmp_path / "tok"), "".join(sorted(chars)))
    out = tmp_path / "shk"
    argv = ["--data", "shakespeare", "--tokenizer", str(tmp_path / "tok"), "--preset", "fp-mdlm-tiny",
            "--out", str(out), "--seq-len", "64", "--batch-size", "16", "--max-steps", "300", "--lr", "1e-3",
            "--warmup-steps", "20", "--eval-every", "100", "--eval-batches", "8", "--save-every", "0"]
    run(argv)
    nelbo = [r["val_nelbo"] for r in read_log(out) if "val_nelbo" in r]
    uniform = math.log(len(tok) - 1)  # NELBO of the initial model (zero-initialised head: uniform logits)
    print(f"vocab {len(tok)}, uniform NELBO {uniform:.3f}, val NELBO by eval (step 0 first): {nelbo}")
    assert abs(nelbo[0] - uniform) < 0.3  # one MC draw per batch: the 1/t weight makes it noisy
    assert nelbo[-1] < nelbo[0] - 0.5


def test_sample_entropy_is_nan_not_a_crash_when_sampling_diverges():
    # identity concat injection, scaled: f(z) = 1e20 z; the safety net off, as in older checkpoints
    model = FPMGMForMaskedGeneration(tiny_config(injection="concat_mlp", fp_divergence_patience=None)).eval()
    with torch.no_grad():
        model.model.injection.fc2.weight.mul_(1e20)
    stub = types.SimpleNamespace(args=types.SimpleNamespace(seed=0, seq_len=8, sample_steps=4))
    assert math.isnan(Trainer.sample_entropy(stub, model))
    healthy = FPMGMForMaskedGeneration(tiny_config()).eval()
    assert Trainer.sample_entropy(stub, healthy) >= 0
