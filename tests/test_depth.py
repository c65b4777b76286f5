"""The depth profile (evaluation.depth): the same masks for every iteration count, KL against an independent
computation, start residuals that replay what generate's own solver saw, and the CLI's refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MASK, tiny_config, tiny_model

from fpmgm_hf import FPMGMForMaskedGeneration
from fpmgm_hf.evaluation.depth import logit_kl_by_iters, main, nelbo_by_iters, start_residuals


def clean_blocks(n=12, length=16, seed=0):
    return torch.randint(0, MASK, (n, length), generator=torch.Generator().manual_seed(seed))


def test_nelbo_uses_the_same_masks_for_every_iteration_count():
    # A fresh model's shared block is the identity (zero-initialised adaLN gates) and `injection="none"` makes the
    # map F(z) = z: every iteration count gives the same logits, so only different masks could change the NELBO.
    torch.manual_seed(0)
    model = FPMGMForMaskedGeneration(tiny_config(injection="none")).eval()
    with torch.no_grad():
        model.lm_head.linear.weight.normal_(0, 0.5)  # a head that is not zero, so the masks matter
    values = nelbo_by_iters(model, clean_blocks(), (1, 3, 8), batch_size=5)
    assert len(set(values.values())) == 1 and math.isfinite(values[1])
    other_seed = nelbo_by_iters(model, clean_blocks(), (1,), batch_size=5, seed=7)[1]
    assert other_seed != values[1]  # the check above can fail: other masks do change the value


def test_nelbo_changes_with_iterations_when_the_block_does_work():
    values = nelbo_by_iters(tiny_model(), clean_blocks(), (1, 2, 16), batch_size=6)
    assert values[1] != values[2] and all(math.isfinite(v) for v in values.values())


def test_kl_to_converged_matches_an_independent_computation_and_vanishes_at_convergence():
    model = tiny_model()
    blocks = clean_blocks(6)
    kl = logit_kl_by_iters(model, blocks, (1, 64), rates=(0.5,), converged=64, seed=3)[0.5]
    assert kl[64] == pytest.approx(0.0, abs=1e-12) and kl[1] > 1e-6
    # Reference: the same canvas (same generator draws), torch's kl_div over the masked rows, mask logit removed.
    from fpmgm_hf.evaluation.stability import masked_canvases

    x = masked_canvases(blocks, 0.5, MASK, torch.Generator().manual_seed(3))
    t = torch.full((x.shape[0],), 0.5)
    with torch.no_grad():
        rows = x == MASK
        ref = model(x, timesteps=t, fp_iters=64, fp_tol=0).logits[rows].double()[:, :MASK]
        one = model(x, timesteps=t, fp_iters=1, fp_tol=0).logits[rows].double()[:, :MASK]
    expected = F.kl_div(F.log_softmax(one, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    assert kl[1] == pytest.approx(float(expected.mean()), rel=1e-9)


def test_start_residuals_replay_what_generate_saw():
    # With one iteration per step, generate's own step_stats residual is the residual of the first iteration
    # from the 3SR start: the replay's "3sr" figure must equal its median (first step excluded).
    model = tiny_model(max_position_embeddings=16)
    out = start_residuals(model, seq_len=16, steps=(6,), batch_size=3, seed=1)[6]
    res = model.generate(batch_size=3, seq_len=16, num_steps=6, budget=18, reuse="3sr", use_cache=False,
                         generator=torch.Generator().manual_seed(1), return_dict_in_generate=True)
    seen = torch.stack([s["residual"] for s in res.step_stats[1:]]).flatten()
    seen = seen[~torch.isnan(seen)]
    assert out["3sr"] == pytest.approx(float(seen.median()), rel=1e-5)
    assert out["h_pre"] > 0 and out["full"] > 0
    # KL(converged || one iteration) from each start: finite, positive (one iteration is not the fixed point),
    # and, with 64 iterations from h_pre as the reference, a longer reference run changes it little
    kls = [out[k] for k in ("kl_h_pre", "kl_3sr", "kl_full")]
    assert all(math.isfinite(k) and k > 0 for k in kls)
    again = start_residuals(model, seq_len=16, steps=(6,), batch_size=3, seed=1, converged=128)[6]
    assert again["kl_h_pre"] == pytest.approx(out["kl_h_pre"], rel=1e-3)


def test_cli_refuses_a_model_without_a_fixed_point_block(tmp_path, capsys):
    folder = tmp_path / "mdlm"
    FPMGMForMaskedGeneration(tiny_config(num_fp_layers=0)).save_pretrained(folder)
    with pytest.raises(SystemExit):
        main([str(folder)])
    assert "no fixed-point block" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(folder), "--steps", "1"])
    assert "--steps must all be >= 2" in capsys.readouterr().err

