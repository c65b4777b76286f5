"""An in-domain evaluation LM: a small GPT-2-style causal LM trained on the same tokens as the masked models,
to score their samples next to a general LM (a general LM misses differences inside a narrow domain).

    fpmgm-eval train-lm --data shakespeare --tokenizer outputs/repro/tokenizer --out outputs/repro/char-lm

The run trains on the training blocks (the same packing and split as `fpmgm-train`), keeps the weights with
the best validation loss, and saves a `save_pretrained` folder with the tokenizer, which `load_eval_lm(path)`
and `fpmgm-eval sweep --eval-lm path` accept. It checkpoints every `--save-every` steps (weights and
optimizer as safetensors, counters as JSON, nothing pickled) and `--resume` continues exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

Tensor = torch.Tensor
STATE = "state.json"


def build_parser(parser=None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fpmgm-eval train-lm", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--data", default="shakespeare", help="as in fpmgm-train: a bundled corpus or local files")
    a("--tokenizer", required=True, help="tokenizer folder (the masked models' tokenizer)")
    a("--out", required=True, help="output folder: final/ (best validation loss), checkpoint/, log.jsonl")
    a("--seq-len", type=int, default=128, help="tokens per block (also the LM's context)")
    a("--val-fraction", type=float, default=0.05, help="held-out fraction (the last blocks), as in fpmgm-train")
    a("--hidden", type=int, default=256, help="width")
    a("--layers", type=int, default=4, help="transformer layers")
    a("--heads", type=int, default=4, help="attention heads")
    a("--dropout", type=float, default=0.1, help="residual / attention / embedding dropout")
    a("--batch-size", type=int, default=32, help="blocks per step")
    a("--max-steps", type=int, default=4000, help="optimizer steps")
    a("--lr", type=float, default=1e-3, help="peak learning rate (warm-up 100 steps, cosine to 10 percent)")
    a("--eval-every", type=int, default=250, help="validate every N steps (the best weights are kept)")
    a("--save-every", type=int, default=250, help="checkpoint every N steps")
    a("--resume", action="store_true", help="continue from OUT/checkpoint when it exists")
    a("--seed", type=int, default=0, help="seed of init and data order")
    a("--threads", type=int, default=0, help="torch threads (0 = default)")
    return p


def build_lm(tokenizer, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.seq_len + 1, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                        attn_pdrop=args.dropout, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def _with_bos(blocks: Tensor, bos: int) -> Tensor:
    """`(N, L)` -> `(N, L + 1)`: a BOS in front of every block, as the scorer adds one to every sample."""
    return torch.cat([torch.full((blocks.shape[0], 1), bos, dtype=blocks.dtype), blocks], dim=1)


@torch.no_grad()
def validation_loss(model, blocks: Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats per token) over `blocks (N, L + 1)`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        x = blocks[start:start + batch_size]
        total += float(model(input_ids=x, labels=x).loss) * x[:, 1:].numel()
        count += x[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def _lr(step: int, args) -> float:
    warm = min(1.0, (step + 1) / 100)
    progress = min(1.0, step / max(1, args.max_steps))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, model, opt, state: dict) -> None:
    from safetensors.torch import save_file, save_model

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / head
    flat, meta = _flatten_optimizer(opt.state_dict())
    save_file(flat, str(tmp / "optimizer.safetensors"))
    (tmp / STATE).write_text(json.dumps({**state, "optimizer_meta": meta}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    """AdamW's state dict as flat tensors + JSON (no pickle)."""
    flat = {}
    for pid, slots in sd["state"].items():
        for name, value in slots.items():
            flat[f"{pid}.{name}"] = value.detach().clone().reshape(-1) if value.dim() == 0 else value.contiguous()
    return flat, {"param_groups": sd["param_groups"],
                  "shapes": {k: list(sd["state"][int(k.split(".")[0])][k.split(".", 1)[1]].shape) for k in flat}}


def _load_checkpoint(path: Path, model, opt) -> dict:
    from safetensors.torch import load_file, load_model

    load_model(model, str(path / "model.safetensors"))
    state = json.loads((path / STATE).read_text())
    meta = state.pop("optimizer_meta")
    flat = load_file(str(path / "optimizer.safetensors"))
    slots: dict = {}
    for key, value in flat.items():
        pid, name = key.split(".", 1)
        slots.setdefault(int(pid), {})[name] = value.reshape(meta["shapes"][key])
    opt.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return state


def train_reference_lm(args) -> str:
    """Train (or resume) the reference LM; returns the folder of the best weights."""
    from ..data import BlockSampler, load_blocks, load_training_tokenizer, split_blocks

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_training_tokenizer(args.tokenizer)
    train, val = split_blocks(load_blocks(args.data, tokenizer, args.seq_len), args.val_fraction)
    train, val = _with_bos(train, tokenizer.bos_token_id), _with_bos(val, tokenizer.bos_token_id)
    model = build_lm(tokenizer, args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.99))
    sampler = BlockSampler(train.shape[0], args.batch_size, 0, args.batch_size, args.seed)
    state = {"step": 0, "best_val": math.inf, "best_step": -1}
    if args.resume and (out / "checkpoint" / STATE).is_file():
        state = _load_checkpoint(out / "checkpoint", model, opt)
    t0 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, initial=state["step"], desc="train-lm", unit="step")
    while state["step"] < args.max_steps:
        torch.manual_seed(args.seed * 100_003 + state["step"])  # dropout: a function of the step, so resume is exact
        for group in opt.param_groups:
            group["lr"] = _lr(state["step"], args)
        x = train[sampler.indices(state["step"])]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        loss = loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1
        step = state["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % args.eval_every == 0 or step == args.max_steps:
            val_loss = validation_loss(model, val, args.batch_size)
            record = {"step": step, "loss": loss, "val_loss": val_loss, "seconds": round(time.time() - t0)}
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[train-lm] step {step}: loss {loss:.4f}, val {val_loss:.4f}", flush=True)
            if val_loss < state["best_val"]:
                state.update(best_val=val_loss, best_step=step)
                _export(model, tokenizer, out / "final", state)
        if step % args.save_every == 0 or step == args.max_steps:
            _save_checkpoint(out / "checkpoint", model, opt, state)
    bar.close()
    return str(out / "final")


def _export(model, tokenizer, path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "reference_lm.json").write_text(json.dumps({"val_loss": state["best_val"], "step": state["best_step"]}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
