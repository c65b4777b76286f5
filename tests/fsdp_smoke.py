"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 with the wrap policy of
conversion/accelerate/fsdp.yaml (one unit per `FPMGMBlock`, the root last). Each rank trains on its half of a
batch (S-JFB, dropout off); the gathered gradients must equal a single-process model's on the whole batch, one
optimizer step later the gathered full state dict must equal that model's weights, and `save_pretrained` from
the gathered state dict must load back into a plain model that gives the same logits.

Accelerate 1.15 turns FSDP on only for accelerator devices (`AcceleratorState` keeps MULTI_CPU as DDP), so on a
CPU machine this calls torch's `fully_shard` directly; the model code it checks is the same.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration


def loss_of(model, ids, t):
    out = model(ids, timesteps=t, generator=torch.Generator().manual_seed(5))  # same S-JFB draws everywhere
    return out.logits.float().log_softmax(-1).gather(-1, ids[..., None]).mean()


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = FPMGMConfig(vocab_size=40, mask_token_id=39, hidden_size=32, num_attention_heads=4, cond_dim=16,
                         max_position_embeddings=64, dropout=0.0)
    model, ref = FPMGMForMaskedGeneration(config).train(), FPMGMForMaskedGeneration(config).train()
    ref.load_state_dict(model.state_dict())
    for block in [*model.model.pre_blocks, *model.model.fp_blocks, *model.model.post_blocks]:
        fully_shard(block)
    fully_shard(model)
    g = torch.Generator().manual_seed(1)
    ids, t = torch.randint(0, 39, (4, 16), generator=g), torch.rand(4, generator=g)  # (B, L), (B,)
    halves = [(ids[i * 2:(i + 1) * 2], t[i * 2:(i + 1) * 2]) for i in range(2)]
    opt, ref_opt = torch.optim.AdamW(model.parameters(), 1e-2), torch.optim.AdamW(ref.parameters(), 1e-2)
    loss_of(model, *halves[rank]).backward()
    (sum(loss_of(ref, *h) for h in halves) / 2).backward()  # FSDP averages the ranks' gradients
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    grad_err = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    opt.step(), ref_opt.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0
    if rank == 0:
        weight_err = max((full[n] - p).abs().max().item() for n, p in ref.state_dict().items())
        FPMGMForMaskedGeneration(config).save_pretrained(out_dir, state_dict=full)
        loaded = FPMGMForMaskedGeneration.from_pretrained(out_dir).eval()
        with torch.no_grad():
            logit_err = (loaded(ids, timesteps=t).logits - ref.eval()(ids, timesteps=t).logits).abs().max().item()
        print(f"grad_err={grad_err:.3g} weight_err={weight_err:.3g} logit_err={logit_err:.3g} "
              f"grad_norm={sum(g.norm() for g in grads.values()).item():.3g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
