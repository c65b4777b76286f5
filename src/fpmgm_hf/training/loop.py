"""The training loop that text training (`fpmgm_hf.training.train`), image training (`fpmgm_hf.images.train`) and the
converter's fine-tuning (`fpmgm_hf.conversion.distill`) share: an Accelerate loop with exact resume, rotated
checkpoints, Accelerate trackers (the JSONL log is one of them, `fpmgm_hf.training.tracking`), validation, early
stop and optional LoRA; `fpmgm_hf.training.export` writes the Hub-ready folder at the end.

Checkpoints are `OUT/checkpoints/step_N` (Accelerate state, `trainer_state.json`, EMA and random states as
safetensors, a `checksums.json` manifest), written to a temporary folder and renamed into place.
`--save-total-limit K` keeps the newest K; the limit is the Accelerator's `ProjectConfiguration.total_limit`.
The rotation is ours rather than Accelerate's `automatic_checkpoint_naming` (which writes `checkpoint_<i>` in
place, numbered by save count): checkpoints stay atomic and named by their step, which `--resume` and the
scripts that read them rely on. `--resume latest` continues from the newest checkpoint when there is one and
starts fresh when there is none; `--resume DIR` needs DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
from contextlib import contextmanager
from typing import Optional

import torch

from ..data import BlockSampler, fingerprint
from ..validation_fpmgm import MANIFEST_NAME, verify_folder, weight_file_problems, write_manifest
from . import trainer_state
from .objectives import consistency_loss, consistency_weight_at, mdlm_nelbo
from .runlock import folder_lock
from .tracking import parse_report_to, start_trackers

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# Settings that must match for `--resume` to continue the same run.
RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "num_processes", "seed", "train_blocks", "data_fingerprint",
               "vocab_size", "mask_token_id", "consistency_weight", "eps", "ema", "lora_r")
RESUME_DEFAULTS = {"lora_r": 0}  # keys that checkpoints of earlier versions do not have


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
    a("--save-total-limit", type=int, default=None,
      help="Keep only the newest N checkpoints (Accelerate ProjectConfiguration.total_limit); default: all.")
    a("--resume", default=None,
      help="'latest': continue from the newest checkpoint in OUT/checkpoints if there is one, else start fresh; "
           "or a checkpoint folder to continue from.")
    a("--overwrite", action="store_true",
      help="start over in an --out that holds an earlier run (its checkpoints, log and final/ are removed first); "
           "without it, or --resume, such an --out is refused")
    a("--consistency-weight", type=float, default=0.0, help="Target lambda of the consistency loss (0 = off).")
    a("--consistency-warmup", type=int, default=5000, help="Steps of the linear lambda ramp 0 -> target.")
    a("--consistency-gap", type=float, nargs=2, default=(0.05, 0.30), help="Range of the teacher time gap.")
    a("--stop-ppl-rise", type=float, default=None,
      help="Consistency stage: stop at the first eval whose validation perplexity exceeds the pre-stage value "
           "by this fraction.")
    a("--cpu", action="store_true", help="Force CPU even when an accelerator is available.")
    a("--report-to", default=None,
      help="Comma-separated Accelerate trackers besides OUT/log.jsonl (tensorboard, wandb, mlflow, ...; 'none'); "
           "default: tensorboard when installed. File-based ones write under OUT/logs/.")
    a("--run-name", default=None, help="Project / run name given to the trackers (default: the --out folder's name).")
    a("--lora-r", type=int, default=0,
      help="Train rank-R LoRA adapters on the blocks' Linear layers (+ the full injection) instead of all weights; "
           "needs --from (a trained model).")
    a("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x --lora-r).")
    a("--keep-adapter", action="store_true",
      help="With --lora-r: export the base weights plus the PEFT adapter (adapter_config.json, "
           "adapter_model.safetensors) instead of merging them.")
    a("--push-to-hub", default=None, metavar="REPO_ID", help="Upload the exported folder (with its card) to the Hub.")
    a("--private", action="store_true", help="Create the --push-to-hub repo as private.")
    a("--revision", default=None, help="Branch of the --push-to-hub repo (created if missing).")


def check_loop_args(args) -> None:
    """The shared flags' values, each error naming its flag."""
    for name in ("grad_accum", "max_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for name in ("warmup_steps", "eval_every", "eval_batches", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}.")
    for name in ("weight_decay", "clip", "consistency_weight"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(args, name)}.")
    if not str(args.out).strip():
        raise ValueError("--out must name a folder, got an empty string.")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {args.seed}.")
    eps = getattr(args, "eps", None)
    if eps is not None and not (math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"--eps must be in (0, 1) (the schedule's epsilon, e.g. 1e-3), got {eps}.")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ValueError(f"--ema must be in (0, 1), got {args.ema}.")
    check_rotation_and_adapter_args(args)
    if args.lora_r < 0:
        raise ValueError(f"--lora-r must be >= 0, got {args.lora_r}.")
    if args.lora_r and not getattr(args, "init_from", None):
        raise ValueError("--lora-r trains adapters on a trained model: give --from FOLDER.")
    if (args.private or args.revision) and not args.push_to_hub:
        raise ValueError("--private / --revision apply to --push-to-hub REPO_ID, which is missing.")
    parse_report_to(args.report_to)


def check_rotation_and_adapter_args(args) -> None:
    """`--save-total-limit` and `--keep-adapter`, flags fpmgm-train and the converter share."""
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise ValueError(f"--save-total-limit must be >= 1, got {args.save_total_limit}.")
    if args.keep_adapter and not args.lora_r:
        raise ValueError("--keep-adapter keeps LoRA adapters: it needs --lora-r.")


def make_accelerator(args, log_with=()):
    """The run's Accelerator: `--grad-accum`, `--cpu`, `--mixed-precision`, the trackers of `--report-to` (plus
    `log_with`: names or `GeneralTracker` objects) and a `ProjectConfiguration` for `--out` carrying
    `--save-total-limit`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kwargs = {"gradient_accumulation_steps": args.grad_accum, "cpu": args.cpu}
    if getattr(args, "mixed_precision", None) is not None:
        kwargs["mixed_precision"] = args.mixed_precision
    project = ProjectConfiguration(project_dir=args.out, logging_dir=os.path.join(args.out, "logs"),
                                   total_limit=args.save_total_limit)
    trackers = [*parse_report_to(args.report_to), *log_with]
    return Accelerator(log_with=trackers or None, project_config=project, **kwargs)


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
        # Not registered with Accelerate: it would pickle the EMA (see fpmgm_hf.training.trainer_state).
        self.ema = EMA(accelerator.unwrap_model(self.model), args.ema) if args.ema else None
        rank, world = accelerator.process_index, accelerator.num_processes
        self.sampler = BlockSampler(len(train_blocks), args.batch_size * world, rank, args.batch_size, args.seed)
        self.generator = torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)  # noise + S-JFB draws
        self.step, self.baseline_ppl, self.stopped, self.last_eval = 0, None, False, None
        self.meta = {"seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                     "num_processes": world, "seed": args.seed, "train_blocks": len(train_blocks),
                     "data_fingerprint": fingerprint(train_blocks), "vocab_size": model.config.vocab_size,
                     "mask_token_id": model.config.mask_token_id, "consistency_weight": args.consistency_weight,
                     "eps": args.eps, "ema": args.ema, "lora_r": getattr(args, "lora_r", 0) or 0,
                     "model_config": _arch(model.config)}

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
            x0 = self.train_blocks[idx].to(acc.device, torch.long)  # blocks may be int32 on disk
            with acc.accumulate(self.model):
                loss, extra = self.loss(x0)
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               a.clip if a.clip > 0 else math.inf)
                    self._check_finite(loss, norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            losses.append(loss.detach())
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.model))
        self.step += 1
        mean = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
        return {"step": self.step, "loss": mean, "lr": lr, **extra}

    def _check_finite(self, loss, grad_norm) -> None:
        """Stop before an update that would write NaN or inf into the weights; the last checkpoint stays good."""
        if bool(torch.isfinite(loss.detach())) and (grad_norm is None or bool(torch.isfinite(grad_norm))):
            return
        raise FloatingPointError(
            f"step {self.step + 1}: the loss ({float(loss):.4g}) or the gradient norm "
            f"({float(grad_norm) if grad_norm is not None else float('nan'):.4g}) is not finite; stopped before the "
            f"update, so the weights and the checkpoints in {self.args.out}/checkpoints are the last good ones. "
            "Resume from one (--resume latest) with a smaller --lr.")

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
            total += self.validation_sums(model, shard[start:start + a.batch_size].to(acc.device, torch.long), g)
        total = acc.reduce(total, reduction="sum")
        result = {"step": self.step, "val_nelbo": (total[0] / total[1].clamp_min(1)).item()}
        result["val_ppl"] = math.exp(min(result["val_nelbo"], 700.0))
        if self.sample_during_eval and a.consistency_weight > 0 and acc.is_main_process:
            result["sample_entropy"] = self.sample_entropy(model)
        if self.ema is not None:
            self.ema.swap(model)
        model.train()
        self.last_eval = result
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
        """One record to every tracker (`accelerator.log`, main process): OUT/log.jsonl and `--report-to`'s."""
        self.acc.log(dict(record), step=record.get("step"))

    def start_tracking(self, resume_step: Optional[int]) -> None:
        a = self.args
        start_trackers(self.acc, a.out, run_name=getattr(a, "run_name", None) or os.path.basename(
            os.path.abspath(a.out)), config={**self.meta, "lr": self.lr}, resume_step=resume_step)

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
            rotate_checkpoints(root, acc.project_configuration.total_limit)
        acc.wait_for_everyone()
        return final

    def load(self, path: str) -> None:
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise ValueError(f"--resume: {path!r} is not a checkpoint folder (no {STATE_FILE}).")
        state = trainer_state.read_state(path, STATE_FILE)
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


def checkpoints(root: str) -> list[str]:
    """The `step_N` folders under `root`, oldest first."""
    names = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()] if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d[5:]))]


def rotate_checkpoints(root: str, limit: Optional[int]) -> None:
    """Delete the oldest checkpoints beyond the newest `limit` (None: keep all)."""
    if limit:
        for path in checkpoints(root)[:-limit]:
            shutil.rmtree(path, ignore_errors=True)


def _arch(config) -> dict:
    keys = ("hidden_size", "num_attention_heads", "mlp_ratio", "cond_dim", "num_pre_layers", "num_fp_layers",
            "num_post_layers", "injection", "time_conditioning", "num_classes")
    return {k: getattr(config, k) for k in keys}


def check_resume(saved: dict, current: dict, path: str) -> None:
    """Raise ValueError naming every setting that differs between the checkpoint and this run."""
    diffs = []
    for key in RESUME_KEYS:
        was = saved.get(key, RESUME_DEFAULTS.get(key))
        if was != current.get(key):
            diffs.append(f"{key}: checkpoint {was!r} vs this run {current.get(key)!r}")
    for key, value in current["model_config"].items():
        if saved.get("model_config", {}).get(key) != value:
            diffs.append(f"model {key}: checkpoint {saved.get('model_config', {}).get(key)!r} vs this run {value!r}")
    if diffs:
        raise ValueError(f"cannot resume from {path!r}, it was saved by an incompatible run: " + "; ".join(diffs))


def resolve_resume(spec: Optional[str], out: str) -> Optional[str]:
    """The checkpoint folder to continue from: None without `--resume`, the newest `OUT/checkpoints/step_N` for
    'latest' (None, i.e. a fresh start, when there is none), else the folder given (which must exist)."""
    if spec is None:
        return None
    if spec != "latest":
        if not os.path.isdir(spec):
            raise ValueError(f"--resume: checkpoint folder {spec!r} does not exist.")
        return spec
    found = checkpoints(os.path.join(out, "checkpoints"))
    if not found:
        logger.info("--resume latest: no checkpoint under %s yet; starting fresh.", out)
        return None
    return found[-1]


RUN_FILES = ("checkpoints", "log.jsonl", "final")  # what a run leaves in its --out


def start_run(args, accelerator) -> Optional[str]:
    """The checkpoint to continue from (`resolve_resume`), after checking that a fresh run does not land on an
    earlier one: an --out holding its checkpoints, log or final/ is refused unless --resume (continue it) or
    --overwrite (remove them first, main process), so a later `--resume latest` never picks up a stale run."""
    if args.resume is not None and getattr(args, "overwrite", False):
        raise ValueError("--resume continues the run in --out and --overwrite starts it over; give only one.")
    if args.resume is None:
        found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
        if found and not getattr(args, "overwrite", False):
            raise FileExistsError(f"--out {args.out} holds an earlier run ({', '.join(found)}); pass --resume latest "
                                  "to continue it or --overwrite to start over.")
        if found and accelerator.is_main_process:
            for name in found:
                path = os.path.join(args.out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        accelerator.wait_for_everyone()
    return resolve_resume(args.resume, args.out)


def begin(trainer: Trainer, resume: Optional[str]) -> None:
    """Load `resume` (a checkpoint folder) or, for a fresh run, evaluate at step 0: in the consistency
    stage that value is the reference of `--stop-ppl-rise`. Starts the trackers (a resumed run's log loses the
    records after the checkpoint's step)."""
    args = trainer.args
    if resume:
        trainer.load(resume)
    trainer.start_tracking(trainer.step if resume else None)
    if resume:
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


@contextmanager
def output_lock(out: str, accelerator):
    """Create `out` and hold its folder lock for the run (main process; the others follow it): a second run, or
    any other tool writing into the same folder, is refused instead of interleaving logs and overwriting files."""
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
    with folder_lock(out, enabled=accelerator.is_main_process):
        yield

