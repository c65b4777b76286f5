"""The model behaves like other transformers models: a loss from `labels` (so `transformers.Trainer` trains it),
hidden states and attentions as transformers defines them, `attn_implementation` honoured, unknown arguments
refused."""

import math

import pytest
import torch
from conftest import MASK, VOCAB, tiny_config, tiny_model

from fpmgm_hf import FPMGMForMaskedGeneration
from fpmgm_hf.loss_fpmgm import mdlm_nelbo


def clean(batch=3, length=12, seed=0):
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ labels


def test_labels_give_the_mdlm_nelbo_as_loss():
    model = tiny_model().eval()
    x0 = clean()
    out = model(x0, labels=x0, generator=torch.Generator().manual_seed(5))
    ref, aux = mdlm_nelbo(model, x0, generator=torch.Generator().manual_seed(5))  # the same draws, by hand
    torch.testing.assert_close(out.loss, ref)
    assert out.logits.shape == (3, 12, VOCAB) and torch.equal(out.logits, aux["output"].logits)
    assert out.to_tuple()[0] is out.loss  # loss first, as Trainer reads it


def test_labels_minus_100_are_context_never_masked_nor_scored():
    model = tiny_model().eval()
    x0 = clean()
    labels = x0.clone()
    labels[:, :4] = -100  # a prompt
    seen = []
    handle = model.model.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].clone()), with_kwargs=True)
    out = model(x0, labels=labels, generator=torch.Generator().manual_seed(1))
    handle.remove()
    assert torch.equal(seen[0][:, :4], x0[:, :4]) and (seen[0][:, 4:] == MASK).any()
    # Reference: the NELBO over the scored positions only (same draws).
    ref, _ = mdlm_nelbo(model, x0, generator=torch.Generator().manual_seed(1), loss_mask=labels != -100)
    torch.testing.assert_close(out.loss, ref)
    with pytest.raises(ValueError, match="`labels` shape"):
        model(x0, labels=x0[:, :5])


def test_a_plain_transformers_trainer_trains_and_resumes(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, MASK, (MASK,), generator=g)  # a deterministic chain: learnable fast
    rows = []
    for _ in range(256):
        x = [int(torch.randint(0, MASK, (1,), generator=g))]
        for _ in range(15):
            x.append(int(successors[x[-1]]))
        rows.append({"input_ids": x, "labels": x})
    data = Dataset.from_list(rows)

    def run(out, steps, resume=None):
        torch.manual_seed(0)
        model = FPMGMForMaskedGeneration(tiny_config(max_position_embeddings=16))
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, logging_steps=1, save_steps=10, report_to=[], seed=0,
                                 use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return [r["loss"] for r in trainer.state.log_history if "loss" in r]

    losses = run(tmp_path / "a", 40)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # it learns
    resumed = run(tmp_path / "a", 50, resume=str(tmp_path / "a" / "checkpoint-40"))  # Trainer's own checkpoints
    assert len(resumed) >= 10 and all(math.isfinite(v) for v in resumed)


# ------------------------------------------------------------------------------------ outputs and kwargs


def test_hidden_states_and_attentions_as_transformers_defines_them():
    model = tiny_model(num_pre_layers=2, num_post_layers=1)
    x = clean()
    x[:, ::3] = MASK
    out = model(x, fp_iters=6, output_hidden_states=True, output_attentions=True)
    hs = out.hidden_states
    assert isinstance(hs, tuple) and len(hs) == 1 + 2 + 1 + 1  # embeddings, 2 pre, the fixed point, 1 post
    torch.testing.assert_close(hs[0], model.model.embed_tokens(x))
    assert torch.equal(hs[3], out.fixed_point) and torch.equal(hs[-1], out.last_hidden_state)
    att = out.attentions
    assert len(att) == 2 + 1 + 1 and all(a.shape == (3, 4, 12, 12) for a in att)
    torch.testing.assert_close(att[0].sum(-1), torch.ones(3, 4, 12))  # rows of a softmax
    plain = model(x, fp_iters=6)
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(plain.logits, out.logits, atol=1e-5, rtol=1e-5)  # eager kernel vs sdpa
    mdlm = tiny_model(num_fp_layers=0, num_pre_layers=3, num_post_layers=0)
    assert len(mdlm(x, output_hidden_states=True).hidden_states) == 4  # no fixed-point entry without one


def test_unknown_keyword_arguments_are_refused_by_name():
    model = tiny_model()
    with pytest.raises(TypeError, match="bogus_kwarg"):
        model(clean(), bogus_kwarg=123)
    with pytest.raises(TypeError, match="bogus_kwarg"):
        model.model(clean(), bogus_kwarg=123)


# ------------------------------------------------------------------------------------- attention kernels


def test_eager_and_sdpa_agree_and_set_attn_implementation_takes_effect():
    model = tiny_model()
    x = clean()
    x[:, 1::2] = MASK
    mask = torch.ones_like(x)
    mask[0, -3:] = 0
    sdpa = model(x, attention_mask=mask).logits
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        model.set_attn_implementation("eager")
        eager = model(x, attention_mask=mask).logits
        assert model.config._attn_implementation == "eager" and not calls  # the eager kernel really ran
        model.set_attn_implementation("sdpa")
        model(x, attention_mask=mask)
        assert calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    keep = mask.bool()
    torch.testing.assert_close(eager[keep], sdpa[keep], atol=1e-5, rtol=1e-5)


def test_attn_implementation_at_load_and_unsupported_ones_refused(tmp_path):
    FPMGMForMaskedGeneration(tiny_config()).save_pretrained(tmp_path / "m")
    eager = FPMGMForMaskedGeneration.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    for impl in ("flash_attention_2", "nonsense"):
        with pytest.raises(ValueError, match="eager|sdpa|support"):
            FPMGMForMaskedGeneration.from_pretrained(tmp_path / "m", attn_implementation=impl)
    with pytest.raises(ValueError):
        eager.set_attn_implementation("nonsense")


# ------------------------------------------------------------------------------------ generation config


def test_a_generation_config_set_on_the_model_is_honoured_and_unusable_options_refused(tmp_path):
    from transformers import GenerationConfig

    model = tiny_model()
    model.generation_config = GenerationConfig(max_new_tokens=5)  # as a transformers user would
    out = model.generate(torch.tensor([[1, 2, 3]]), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and not (out == MASK).any()
    with pytest.raises(ValueError, match="num_beams"):
        model.generation_config = GenerationConfig(max_new_tokens=5, num_beams=2)
    model.generation_config.repetition_penalty = 1.2  # set by hand on our config
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()  # refused before anything was written
    del model.generation_config.repetition_penalty
    model.save_pretrained(tmp_path / "m")
    again = FPMGMForMaskedGeneration.from_pretrained(tmp_path / "m")
    assert again.generation_config.max_new_tokens == 5


# ------------------------------------------------------------------------------------------ meta and CLI


def test_meta_device_forward_gives_shapes_and_loading_paths_work(tmp_path):
    model = tiny_model().to("meta")
    x = torch.randint(0, MASK, (2, 8)).to("meta")
    out = model(x, fp_iters=3)
    assert out.logits.shape == (2, 8, VOCAB) and out.logits.is_meta and out.block_passes.shape == (2,)
    assert model.train()(x).logits.is_meta  # S-JFB on shapes alone
    with pytest.raises(ValueError, match="meta device"):
        model(x, labels=x)
    real = tiny_model()
    real.save_pretrained(tmp_path / "m")
    for kwargs in ({"low_cpu_mem_usage": True}, {"device_map": "auto"}):
        loaded = FPMGMForMaskedGeneration.from_pretrained(tmp_path / "m", **kwargs)
        assert loaded.num_parameters() == real.num_parameters() == sum(p.numel() for p in real.parameters())
        torch.testing.assert_close(loaded(clean(2, 8)).logits, real(clean(2, 8)).logits)


def test_sweep_refuses_impossible_values_by_flag(tmp_path):
    from fpmgm_hf.evaluation.sweep import main

    tiny_model().save_pretrained(tmp_path / "m")
    base = ["sweep", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]
    for extra, flag in ((["--budgets", "0"], "--budgets"), (["--fp-iters", "0"], "--fp-iters"),
                        (["--batch-size", "0"], "--batch-size"), (["--fp-tol", "-1"], "--fp-tol"),
                        (["--names", "a", "b"], "--names")):
        with pytest.raises(ValueError, match=flag):
            main(base + extra)
    assert not (tmp_path / "o").exists()
