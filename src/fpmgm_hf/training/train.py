"""Train an MDLM or FP-MDLM text model with Accelerate, and run the CoFRe consistency stage.

    python -m fpmgm_hf.train --data shakespeare --preset fp-mdlm-tiny --seq-len 128 --max-steps 2000 --out runs/fp
    accelerate launch --num_processes 2 -m fpmgm_hf.train --data corpus.jsonl --preset mdlm-small --out runs/m
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m fpmgm_hf.train ...   # 2 CPU processes
    fpmgm-train --from runs/fp/final --data shakespeare --consistency-weight 0.1 --consistency-warmup 500 \
        --stop-ppl-rise 0.15 --max-steps 3000 --out runs/fp-cofre

Checkpoints (`OUT/checkpoints/step_N`) hold the Accelerate state (model safetensors, optimizer), plus
`trainer_state.json`, the EMA and the per-process random states as safetensors (`fpmgm_hf.trainer_state`:
nothing is unpickled on `--resume`) and a `checksums.json` manifest checked on resume, so `--resume`
reproduces the uninterrupted run exactly. The exported model (`OUT/final`) is a `save_pretrained` folder with
the tokenizer. One run per `--out`: a second one refuses while the first holds `OUT/.fpmgm-run.lock`
(`fpmgm_hf.runlock`). On CPU, `accelerate launch --cpu --num_processes 2` starts a single process unless MPI is
installed; use torchrun as above.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Optional

import torch

from ..data import BlockSampler, fingerprint, load_texts, load_training_tokenizer, pack_blocks, split_blocks
from ..validation_fpmgm import MANIFEST_NAME, verify_folder, weight_file_problems, write_manifest
from . import trainer_state
from .objectives import consistency_loss, consistency_weight_at, mdlm_nelbo
from .runlock import LOCK_NAME, run_lock

logger = logging.getLogger(__name__)

_SMALL = dict(hidden_size=768, num_attention_heads=12, cond_dim=128, dropout=0.1)
_TINY = dict(hidden_size=128, num_attention_heads=4, cond_dim=64, dropout=0.0)
PRESETS = {
    "mdlm-small": dict(_SMALL, num_pre_layers=12, num_fp_layers=0, num_post_layers=0),
    "fp-mdlm-small": dict(_SMALL, num_pre_layers=1, num_fp_layers=1, num_post_layers=1),
    "mdlm-tiny": dict(_TINY, num_pre_layers=6, num_fp_layers=0, num_post_layers=0),
    "fp-mdlm-tiny": dict(_TINY, num_pre_layers=1, num_fp_layers=1, num_post_layers=1),
}
# The paper's exact map (concat_mlp injection, 104M parameters at small size); it expands when iterated
# past its training range (docs/stability), so the default presets use the constrained injection.
for _name in ("fp-mdlm-small", "fp-mdlm-tiny"):
    PRESETS[f"{_name}-paper"] = dict(PRESETS[_name], injection="concat_mlp", fp_residual_reg=0.0)
STATE_FILE = "trainer_state.json"
# Settings that must match for `--resume` to continue the same run.
RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "num_processes", "seed", "train_blocks", "data_fingerprint",
               "vocab_size", "mask_token_id", "consistency_weight", "eps", "ema")


# ------------------------------------------------------------------------------------------------- CLI


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    """The optimisation, checkpoint and consistency-stage flags that text and image training share."""
    a = p.add_argument
    a("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
    a("--max-steps", type=int, default=1000, help="Optimizer steps in total (including resumed ones).")
    a("--lr", type=float, default=None, help="Peak learning rate (default 2e-4 for FP models, 3e-4 otherwise).")
    a("--warmup-steps", type=int, default=100, help="Linear learning-rate warm-up steps; constant afterwards.")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay.")
    a("--clip", type=float, default=1.0, help="Gradient-norm clipping threshold (0 disables).")
    a("--ema", type=float, default=None,
      help="EMA decay (e.g. 0.9999); evaluation and the final export use the EMA weights.")
    a("--seed", type=int, default=0, help="Seed of the model init, the data order and every noise draw.")
    a("--eval-every", type=int, default=200, help="Validate every N optimizer steps (and at the end).")
    a("--eval-batches", type=int, default=20, help="Validation batches per process per evaluation (0 = all).")
    a("--save-every", type=int, default=500, help="Save a resumable checkpoint every N steps (0 = never).")
    a("--resume", default=None, help="Checkpoint folder to continue from, or 'latest' (newest in OUT/checkpoints).")
    a("--consistency-weight", type=float, default=0.0, help="Target lambda of the consistency loss (0 = off).")
    a("--consistency-warmup", type=int, default=5000, help="Steps of the linear lambda ramp 0 -> target.")
    a("--consistency-gap", type=float, nargs=2, default=(0.05, 0.30), help="Range of the teacher time gap.")
    a("--stop-ppl-rise", type=float, default=None,
      help="Consistency stage: stop at the first eval whose validation perplexity exceeds the pre-stage value "
           "by this fraction.")
    a("--cpu", action="store_true", help="Force CPU even when an accelerator is available.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpmgm-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--modality", choices=["text", "image"], default="text",
      help="'image' trains class-conditional FP-MaskGIT on VQ token grids (see fpmgm_hf.image_train).")
    a("--data", required=True,
      help="'shakespeare', 'kjv', comma-separated local .txt/.jsonl files, or a Hub dataset name.")
    a("--text-field", default="text", help="Field holding the text in JSON(L) files and Hub datasets.")
    a("--tokenizer", default=None,
      help="Tokenizer folder or name (default: gpt2 with [MASK]; with --from, that folder's tokenizer).")
    a("--out", required=True, help="Output folder: log.jsonl, checkpoints/step_N, final/.")
    a("--preset", choices=sorted(PRESETS), default="fp-mdlm-tiny", help="Model architecture preset.")
    a("--config", default=None, help="JSON file (or config folder) of FPMGMConfig fields; replaces --preset.")
    a("--from", dest="init_from", default=None,
      help="Start from this save_pretrained folder (e.g. for the consistency stage).")
    a("--seq-len", type=int, default=128, help="Tokens per training block.")
    a("--val-fraction", type=float, default=0.05, help="Fraction of blocks (the last ones) held out for validation.")
    a("--batch-size", type=int, default=8, help="Blocks per process per micro-batch.")
    add_loop_arguments(p)
    a("--eps", type=float, default=1e-3, help="Epsilon of the log-linear noise schedule and of t ~ U[eps, 1].")
    a("--mixed-precision", choices=["no", "fp16", "bf16", "fp8"], default=None,
      help="Passed to Accelerator (default: from `accelerate launch` / config).")
    a("--sample-steps", type=int, default=8, help="Denoising steps of the samples whose entropy is logged.")
    a("--trust-remote-code", action="store_true",
      help="UNSAFE: let the --tokenizer (or --from) folder run its own Python code (an auto_map entry).")
    return p


def _check_args(args) -> None:
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}.")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ValueError(f"--ema must be in (0, 1), got {args.ema}.")
    if args.config and args.init_from:
        raise ValueError("give either --config (a fresh model) or --from (a trained one), not both.")
    for flag, path in (("--config", args.config), ("--from", args.init_from)):
        if path and not os.path.exists(path):
            raise ValueError(f"{flag}: {path!r} does not exist.")


# ---------------------------------------------------------------------------------------------- model


def check_vocab(config, tokenizer, source: str) -> None:
    """The model's vocabulary and mask id must be the tokenizer's."""
    want = {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
    for key, value in want.items():
        if getattr(config, key) != value:
            raise ValueError(f"{source} has {key}={getattr(config, key)} but the tokenizer has {key}={value}.")


def build_model(args, tokenizer):
    from .. import FPMGMConfig, FPMGMForMaskedGeneration

    if args.init_from:
        model = FPMGMForMaskedGeneration.from_pretrained(args.init_from)
        check_vocab(model.config, tokenizer, f"--from {args.init_from}")
        return model
    vocab = {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
    if args.config:
        path = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
        with open(path) as f:
            fields = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        for key, value in vocab.items():
            if key in fields and fields[key] != value:
                raise ValueError(
                    f"--config {args.config} has {key}={fields[key]} but the tokenizer has {key}={value}."
                )
        fields.update(vocab)
    else:
        fields = dict(PRESETS[args.preset], **vocab, max_position_embeddings=max(1024, args.seq_len))
    torch.manual_seed(args.seed)
    return FPMGMForMaskedGeneration(FPMGMConfig(**fields))


class EMA:
    """Exponential moving average of the trainable parameters (checkpointed as `ema.safetensors`)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def swap(self, model) -> None:
        """Exchange the model's weights with the averaged ones (call twice to undo)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                tmp = p.detach().clone()
                p.copy_(self.shadow[n])
                self.shadow[n].copy_(tmp)

    def save(self, folder: str) -> None:
        trainer_state.save_ema(self.shadow, self.decay, folder)

    def load(self, folder: str) -> None:
        self.decay = trainer_state.load_ema(self.shadow, folder)


# --------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Holds one run: accelerator, model, optimizer, data, generators and the logged history."""

    def __init__(self, args, accelerator, model, tokenizer, train_blocks, val_blocks, loss_fn=None):
        """`loss_fn(trainer, x0) -> (loss, extra_log_dict)` replaces the default objective (MDLM NELBO, or
        the CoFRe consistency loss when `args.consistency_weight > 0`); e.g. the converter's distillation loss.
        Only parameters with `requires_grad` are optimised (e.g. LoRA adapters)."""
        self.args, self.acc, self.tokenizer = args, accelerator, tokenizer
        self.loss_fn = loss_fn
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        is_fp = model.config.num_fp_layers > 0
        self.lr = args.lr if args.lr is not None else (2e-4 if is_fp else 3e-4)
        model.train()  # e.g. a `from_pretrained` model is in eval mode; a resumed run must train like the original
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, opt)
        # Not registered with Accelerate: it would pickle the EMA (see fpmgm_hf.trainer_state).
        self.ema = EMA(accelerator.unwrap_model(self.model), args.ema) if args.ema else None
        rank, world = accelerator.process_index, accelerator.num_processes
        self.sampler = BlockSampler(len(train_blocks), args.batch_size * world, rank, args.batch_size, args.seed)
        self.generator = torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)  # noise + S-JFB draws
        self.step, self.baseline_ppl, self.stopped = 0, None, False
        self.meta = {"seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                     "num_processes": world, "seed": args.seed, "train_blocks": len(train_blocks),
                     "data_fingerprint": fingerprint(train_blocks), "vocab_size": model.config.vocab_size,
                     "mask_token_id": model.config.mask_token_id, "consistency_weight": args.consistency_weight,
                     "eps": args.eps, "ema": args.ema, "model_config": _arch(model.config)}
        self.log_path = os.path.join(args.out, "log.jsonl")

    # ------------------------------------------------------------------------------------ one step

    def loss(self, x0: torch.Tensor):
        if self.loss_fn is not None:
            return self.loss_fn(self, x0)
        a = self.args
        if a.consistency_weight > 0:
            lam = consistency_weight_at(self.step, a.consistency_weight, a.consistency_warmup)
            loss, aux = consistency_loss(self.model, x0, generator=self.generator, weight=lam, eps=a.eps,
                                         gap=tuple(a.consistency_gap), teacher=self.acc.unwrap_model(self.model))
            return loss, {"lambda": lam, "task": aux["task"].item(), "consistency": aux["consistency"].item()}
        loss, _ = mdlm_nelbo(self.model, x0, generator=self.generator, eps=a.eps)
        return loss, {}

    def train_step(self) -> dict:
        a, acc = self.args, self.acc
        lr = self.lr * min(1.0, (self.step + 1) / max(1, a.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, extra = [], {}
        for micro in range(a.grad_accum):
            idx = self.sampler.indices(self.step * a.grad_accum + micro)
            x0 = self.train_blocks[idx].to(acc.device)
            with acc.accumulate(self.model):
                loss, extra = self.loss(x0)
                acc.backward(loss)
                if acc.sync_gradients and a.clip > 0:
                    acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], a.clip)
                self.optimizer.step()
                self.optimizer.zero_grad()
            losses.append(loss.detach())
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.model))
        self.step += 1
        mean = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
        return {"step": self.step, "loss": mean, "lr": lr, **extra}

    # ------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation NELBO (nats/token) and perplexity, one antithetic draw per batch from a fixed seed."""
        a, acc = self.args, self.acc
        model = acc.unwrap_model(self.model)
        model.eval()
        if self.ema is not None:
            self.ema.swap(model)
        g = torch.Generator().manual_seed(a.seed + 7919 + acc.process_index)
        shard = self.val_blocks[acc.process_index::acc.num_processes]
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for i, start in enumerate(range(0, len(shard), a.batch_size)):
            if a.eval_batches and i >= a.eval_batches:
                break
            total += self.validation_sums(model, shard[start:start + a.batch_size].to(acc.device), g)
        total = acc.reduce(total, reduction="sum")
        result = {"step": self.step, "val_nelbo": (total[0] / total[1].clamp_min(1)).item()}
        result["val_ppl"] = math.exp(min(result["val_nelbo"], 700.0))
        if self.sample_during_eval and a.consistency_weight > 0 and acc.is_main_process:
            result["sample_entropy"] = self.sample_entropy(model)
        if self.ema is not None:
            self.ema.swap(model)
        model.train()
        return result

    sample_during_eval = True  # log the entropy of a few samples in the consistency stage

    def validation_sums(self, model, batch, generator) -> torch.Tensor:
        """(summed per-token loss, token count) of one validation batch as float64 (2,): here the MDLM NELBO.
        Subclasses change the validation loss by overriding this alone."""
        _, aux = mdlm_nelbo(model, batch, generator=generator, eps=self.args.eps)
        return torch.stack([aux["nll_sum"].double(), aux["num_tokens"].double()])

    def sample_entropy(self, model) -> float:
        """Mean unigram entropy (nats) of 4 unconditional samples: collapse shows as a falling value. NaN when
        the fixed-point iterates overflow (a non-contractive shared block): a diagnostic, never a crash."""
        g = torch.Generator().manual_seed(self.args.seed + 4242)
        try:
            samples = model.generate(batch_size=4, seq_len=self.args.seq_len, num_steps=self.args.sample_steps,
                                     generator=g)
        except FloatingPointError as err:
            logger.warning("sample entropy: sampling diverged (%s); logging NaN", str(err)[:120])
            return float("nan")
        values = []
        for row in samples.cpu():
            p = torch.bincount(row).double() / row.numel()
            p = p[p > 0]
            values.append(float(-(p * p.log()).sum()))
        return sum(values) / len(values)

    def log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
            writer = self._tensorboard()
            if writer and "step" in record:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        writer.add_scalar(key, value, record["step"])

    def _tensorboard(self):
        """A SummaryWriter in OUT/tensorboard when tensorboard is installed (the JSONL log is always written)."""
        if getattr(self, "_tb_writer", None) is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb_writer = SummaryWriter(os.path.join(self.args.out, "tensorboard"))
            except ImportError:
                self._tb_writer = False
        return self._tb_writer

    def check_stop(self, result: dict) -> None:
        rise = self.args.stop_ppl_rise
        if rise is None or self.args.consistency_weight <= 0 or self.baseline_ppl is None:
            return
        if result["val_ppl"] > self.baseline_ppl * (1 + rise):
            self.stopped = True
            self.log({"event": "early_stop", "step": self.step, "val_ppl": result["val_ppl"],
                      "baseline_ppl": self.baseline_ppl, "threshold": self.baseline_ppl * (1 + rise)})

    # ---------------------------------------------------------------------------------- checkpoints

    def save(self) -> str:
        acc = self.acc
        root = os.path.join(self.args.out, "checkpoints")
        final, tmp = os.path.join(root, f"step_{self.step}"), os.path.join(root, f".tmp_step_{self.step}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        trainer_state.save_rng(tmp, acc.process_index, self.generator, acc.step)
        if acc.is_main_process:
            state = dict(self.meta, step=self.step, data_position=self.step * self.args.grad_accum,
                         epoch=self.sampler.epoch_of(self.step * self.args.grad_accum), baseline_ppl=self.baseline_ppl)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1)
            if self.ema is not None:
                self.ema.save(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_manifest(tmp)  # every process's files are written: checked on --resume
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        return final

    def load(self, path: str) -> None:
        state_path = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_path):
            raise ValueError(f"--resume: {path!r} is not a checkpoint folder (no {STATE_FILE}).")
        with open(state_path) as f:
            state = json.load(f)
        check_resume(state, self.meta, path)
        trainer_state.refuse_unsafe_pickles(path)
        bad = weight_file_problems(path)
        if not bad and os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            bad = verify_folder(path)
        elif not bad:
            logger.warning("--resume: %s has no %s (an earlier version's checkpoint); not checked for corruption.",
                           path, MANIFEST_NAME)
        if bad:
            raise ValueError(f"--resume: checkpoint {path!r} is truncated or corrupt:\n  " + "\n  ".join(bad)
                             + "\nDelete it to resume from the previous checkpoint.")
        try:
            self.acc.load_state(path)  # model safetensors; optimizer.bin with torch.load(weights_only=True)
        except pickle.UnpicklingError as err:
            lines = str(err).splitlines() or [""]
            why = next((line.strip() for line in lines if "GLOBAL" in line), lines[0])  # e.g. the refused global
            raise ValueError(f"--resume: {path!r} holds a pickle that the safe loader refuses (corrupt, or a planted "
                             f"object); nothing was run: {why}") from err
        if self.ema is not None:
            self.ema.load(path)
        step = trainer_state.load_rng(path, self.acc.process_index, self.generator)
        if step >= 0:
            self.acc.step = step
        self.step, self.baseline_ppl = state["step"], state.get("baseline_ppl")


def _arch(config) -> dict:
    keys = ("hidden_size", "num_attention_heads", "mlp_ratio", "cond_dim", "num_pre_layers", "num_fp_layers",
            "num_post_layers", "injection", "time_conditioning", "num_classes")
    return {k: getattr(config, k) for k in keys}


def check_resume(saved: dict, current: dict, path: str) -> None:
    """Raise ValueError naming every setting that differs between the checkpoint and this run."""
    diffs = []
    for key in RESUME_KEYS:
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r} vs this run {current.get(key)!r}")
    for key, value in current["model_config"].items():
        if saved.get("model_config", {}).get(key) != value:
            diffs.append(f"model {key}: checkpoint {saved.get('model_config', {}).get(key)!r} vs this run {value!r}")
    if diffs:
        raise ValueError(f"cannot resume from {path!r}, it was saved by an incompatible run: " + "; ".join(diffs))


def resolve_resume(spec: Optional[str], out: str) -> Optional[str]:
    if spec is None:
        return None
    if spec != "latest":
        if not os.path.isdir(spec):
            raise ValueError(f"--resume: checkpoint folder {spec!r} does not exist.")
        return spec
    root = os.path.join(out, "checkpoints")
    steps = [d for d in os.listdir(root) if d.startswith("step_")] if os.path.isdir(root) else []
    if not steps:
        raise ValueError(f"--resume latest: no checkpoint under {root!r}.")
    return os.path.join(root, max(steps, key=lambda d: int(d.split("_")[1])))


# ------------------------------------------------------------------------------------------------ main


def prepare_data(args, tokenizer, accelerator):
    with accelerator.main_process_first():
        texts = load_texts(args.data, args.text_field)
    if not texts:
        raise ValueError(f"--data {args.data!r} holds no text.")
    blocks = pack_blocks(texts, tokenizer, args.seq_len)
    if int(blocks.max()) >= len(tokenizer):
        raise ValueError(f"token id {int(blocks.max())} is outside the tokenizer's size {len(tokenizer)}.")
    return split_blocks(blocks, args.val_fraction)


def begin(trainer: Trainer, resume: Optional[str]) -> None:
    """Load `resume` (a checkpoint folder) or, for a fresh run, evaluate at step 0: in the consistency
    stage that value is the reference of `--stop-ppl-rise`."""
    args = trainer.args
    if resume:
        trainer.load(resume)
        trainer.log({"event": "resume", "step": trainer.step, "from": resume})
    elif args.eval_every:
        result = trainer.evaluate()
        if args.consistency_weight > 0:
            trainer.baseline_ppl = result["val_ppl"]
        trainer.log({**result, "event": "pre_stage" if args.consistency_weight > 0 else "start"})


def run_loop(trainer: Trainer) -> None:
    from tqdm.auto import tqdm

    a, acc = trainer.args, trainer.acc
    bar = tqdm(total=a.max_steps, initial=trainer.step, disable=not acc.is_local_main_process, desc="train")
    while trainer.step < a.max_steps and not trainer.stopped:
        record = trainer.train_step()
        trainer.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        last = trainer.step == a.max_steps
        if a.eval_every and (trainer.step % a.eval_every == 0 or last):
            result = trainer.evaluate()
            trainer.log(result)
            bar.write(f"step {trainer.step}: val NELBO {result['val_nelbo']:.4f}, PPL {result['val_ppl']:.2f}")
            trainer.check_stop(result)
        if a.save_every and (trainer.step % a.save_every == 0 or last or trainer.stopped):
            trainer.save()
    bar.close()


def export(trainer: Trainer) -> str:
    acc = trainer.acc
    acc.wait_for_everyone()
    path = os.path.join(trainer.args.out, "final")
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        if trainer.ema is not None:
            trainer.ema.swap(model)
        tmp = path + ".tmp"  # written whole, then renamed: `final/` is never half-written
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        trainer.tokenizer.save_pretrained(tmp)
        write_manifest(tmp)  # now over the tokenizer / VQ files too
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        if trainer.ema is not None:
            trainer.ema.swap(model)
    acc.wait_for_everyone()
    return path


def _modality(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--modality", default="text")
    return parser.parse_known_args(argv)[0].modality


@contextmanager
def output_lock(out: str, accelerator):
    """Create `out` and hold `out/.fpmgm-run.lock` for the run (main process; the others follow it): a second run
    on the same folder is refused instead of interleaving logs and overwriting checkpoints."""
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
    with run_lock(os.path.join(out, LOCK_NAME), enabled=accelerator.is_main_process):
        yield


def main(argv: Optional[list[str]] = None) -> str:
    """Entry point of `fpmgm-train`; returns the exported model folder. `--modality image` hands the
    arguments to `fpmgm_hf.image_train` (class-conditional FP-MaskGIT on VQ token grids)."""
    from accelerate import Accelerator

    argv = sys.argv[1:] if argv is None else list(argv)
    if _modality(argv) == "image":
        from ..images.train import main as image_main

        return image_main(argv)
    args = build_parser().parse_args(argv)
    _check_args(args)
    acc_kwargs = {"gradient_accumulation_steps": args.grad_accum, "cpu": args.cpu}
    if args.mixed_precision is not None:
        acc_kwargs["mixed_precision"] = args.mixed_precision
    accelerator = Accelerator(**acc_kwargs)
    with output_lock(args.out, accelerator):
        return _train(args, accelerator)


def _train(args, accelerator) -> str:
    resume = resolve_resume(args.resume, args.out)
    tok_source = args.tokenizer
    if tok_source is None and args.init_from and os.path.isfile(os.path.join(args.init_from, "tokenizer_config.json")):
        tok_source = args.init_from
    tokenizer = load_training_tokenizer(tok_source, trust_remote_code=args.trust_remote_code)
    train_blocks, val_blocks = prepare_data(args, tokenizer, accelerator)
    model = build_model(args, tokenizer)
    trainer = Trainer(args, accelerator, model, tokenizer, train_blocks, val_blocks)
    begin(trainer, resume)
    run_loop(trainer)
    return export(trainer)


if __name__ == "__main__":
    main()
