"""The engine behind `app.py`, the Gradio demo (docs/space.md): load models, check the page's fields, and run
`generate` in a worker thread while yielding the canvas after every step (`demo.render` draws them).

Gradio-free, so the tests drive it directly; `app.py` only lays out the page. The only state is the models a
`DemoModels` holds: every run gets its own seeded `torch.Generator`, queue and worker thread.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from ..canvas_fpmgm import plan_blocks
from ..generation_config_fpmgm import MAX_TEMPERATURE, MIN_TEMPERATURE, REUSE_MODES, SAMPLERS
from ..scheduling_fpmgm import FP_SCHEDULES, plan_budget

TEXT, IMAGE = "text", "image"
DEMO_MODEL, DEMO_TEACHER = "outputs/demo/fp-mdlm", "outputs/demo/mdlm/final"
HUB_PREFIX = "hf://"
HOW_TO_MAKE_ONE = (
    "No model is loaded. Make the demo's models with `bash scripts/demo.sh` (trains an MDLM on Shakespeare and "
    f"converts it to a CoFRe FP-MDLM in `{DEMO_MODEL}`), then run `python app.py` again; or pass a "
    "`save_pretrained` folder with `python app.py --model PATH`, or try `python app.py --tiny` (random weights)."
)
# The page's bounds: a public demo answers every request in seconds to minutes, never hours.
MAX_NEW_TOKENS, MAX_STEPS, MAX_BUDGET, MAX_SEED = 1024, 512, 4096, 2**63 - 1
MAX_PROMPT_CHARS, MAX_DELAY_MS, MAX_PER_CLASS, MAX_GUIDANCE = 20_000, 1000, 8, 20.0
FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")


class SettingsError(ValueError):
    """A field of the page holds a bad value; the message names the field and what it accepts."""


class LoadError(ValueError):
    """A model folder cannot be served; the message names the folder and why."""


# --------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """One served model: the network, and its tokenizer (text) or VQ tokenizer and class names (images)."""

    name: str
    path: str
    model: Any
    tokenizer: Any = None
    vq: Any = None
    class_names: tuple = ()

    @property
    def kind(self) -> str:
        return IMAGE if self.vq is not None else TEXT

    @property
    def layers(self) -> tuple[int, int, int]:
        c = self.model.config
        return c.num_pre_layers, c.num_fp_layers, c.num_post_layers

    def describe(self) -> str:
        pre, fp, post = self.layers
        stack = f"{pre} + {fp} fixed-point + {post} layers" if fp else f"{pre + post} layers (no fixed point)"
        c = self.model.config
        return f"**{self.name}** (`{self.path}`): {stack}, context {c.max_position_embeddings}, vocab {c.vocab_size}"


def _model_name(path: str) -> str:
    """'fp-mdlm' for outputs/demo/fp-mdlm, 'mdlm/final' for outputs/demo/mdlm/final (export folders are 'final')."""
    parts = Path(path.rstrip("/")).parts
    return "/".join(parts[-2:]) if parts and parts[-1] in ("final", "model") and len(parts) > 1 else parts[-1]


def hub_folder(spec: str) -> str:
    """`hf://user/repo` -> a local snapshot of that Hub repository (how a Space names its models); other specs
    are local folders and come back unchanged. Only the files are fetched: no code in them runs."""
    if not spec.startswith(HUB_PREFIX):
        return spec
    repo = spec[len(HUB_PREFIX):]
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo)
    except Exception as err:  # offline, no such repository, no access: say which and why
        raise LoadError(f"{spec!r}: could not download {repo!r} from the Hub: {type(err).__name__}: {err}") from err


def load_model(spec: str, trust_remote_code: bool = False, name: Optional[str] = None) -> LoadedModel:
    """Load a `save_pretrained` folder (or `hf://user/repo`) with fpmgm_hf's own classes: no code from the folder
    runs, unless `trust_remote_code` for its tokenizer. Text folders need tokenizer files, image folders `vq/`."""
    from .. import FPMGMForMaskedGeneration

    path = hub_folder(spec)
    if not os.path.isdir(path):
        raise LoadError(f"model folder {path!r} does not exist.")
    try:  # config.json read (and checked against the manifest) by from_pretrained itself
        model = FPMGMForMaskedGeneration.from_pretrained(path).eval()
        config = model.config
    except Exception as err:  # any reason a folder is not an FP-MGM model: say which folder and why
        raise LoadError(f"{path!r} is not a loadable fpmgm model folder: {type(err).__name__}: {err}") from err
    name = name or (spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else _model_name(path))
    if config.position_encoding == "rope_2d":
        return _with_vq(LoadedModel(name, path, model), path)
    from ..data import auto_tokenizer

    try:
        tokenizer = auto_tokenizer(path, trust_remote_code)
    except Exception as err:
        raise LoadError(f"{path!r} has no usable tokenizer files: {type(err).__name__}: {err}") from err
    if len(tokenizer) != config.vocab_size or tokenizer.mask_token_id != config.mask_token_id:
        raise LoadError(f"{path!r}: the tokenizer ({len(tokenizer)} tokens, mask id {tokenizer.mask_token_id}) does "
                        f"not match the model (vocab_size {config.vocab_size}, mask id {config.mask_token_id}).")
    return LoadedModel(name, path, model, tokenizer=tokenizer)


def _with_vq(loaded: LoadedModel, path: str) -> LoadedModel:
    from ..images.vq import VQVAEModel

    config = loaded.model.config
    if not os.path.isdir(os.path.join(path, "vq")):
        raise LoadError(f"{path!r} is an image model but has no `vq/` tokenizer folder to turn tokens into pixels.")
    vq = VQVAEModel.from_pretrained(path, subfolder="vq").eval()
    if tuple(vq.config.grid_size) != tuple(config.grid_size) or vq.config.codebook_size > config.vocab_size:
        raise LoadError(f"{path!r}: the VQ tokenizer (grid {vq.config.grid_size}, {vq.config.codebook_size} codes) "
                        f"does not match the model (grid {tuple(config.grid_size)}, vocab {config.vocab_size}).")
    info_file = os.path.join(path, "image_info.json")
    info = json.loads(Path(info_file).read_text()) if os.path.isfile(info_file) else {}
    count = config.num_classes
    names = info.get("class_names")
    if not names:
        fashion = count == len(FASHION_MNIST) and "fashion" in str(info.get("data", "")).lower()
        names = FASHION_MNIST if fashion else [f"class {i}" for i in range(count)]
    loaded.vq, loaded.class_names = vq, tuple(f"{i}: {n}" for i, n in enumerate(names[:count]))
    if not count:
        raise LoadError(f"{path!r} is an unconditional image model; the image tab needs classes to pick.")
    return loaded


def default_model_paths(root: Union[str, Path]) -> list[str]:
    """The demo's converted model and its MDLM teacher, when `scripts/demo.sh` has made them."""
    found = [Path(root) / DEMO_MODEL, Path(root) / DEMO_TEACHER]
    return [str(p) for p in found if (p / "config.json").is_file()]


TINY_TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
             "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"
             "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'-<>&\"\n")


def _randomized(model, seed: int):
    """Seeded random weights: the default init zeroes the adaLN gates and the head, which would give uniform
    logits and a solver with nothing to do; these give varied tokens and a visible residual."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def build_tiny_models(folder: Union[str, Path]) -> list[str]:
    """Random-weight stand-ins for `app.py --tiny` (tests, a first look): an FP-MDLM and an MDLM sharing a
    character tokenizer, and a class-conditional FP-MaskGIT with a VQ tokenizer. Returns the folders."""
    from .. import FPMGMConfig, FPMGMForMaskedGeneration, VQVAEConfig, VQVAEModel
    from ..data import train_char_tokenizer
    from ..images.train import set_image_generation_defaults
    from ..validation_fpmgm import write_manifest

    folder = Path(folder)
    tok = train_char_tokenizer([TINY_TEXT])
    text = dict(vocab_size=len(tok), mask_token_id=tok.mask_token_id, hidden_size=32, num_attention_heads=4,
                cond_dim=16, max_position_embeddings=128, dropout=0.0)
    image = dict(text, vocab_size=17, mask_token_id=16, num_classes=10, position_encoding="rope_2d", grid_size=(7, 7),
                 max_position_embeddings=49, fp_max_iter=4)
    specs = {"tiny-fp-mdlm": dict(text, num_fp_layers=1), "tiny-mdlm": dict(text, num_pre_layers=2, num_fp_layers=0,
                                                                            num_post_layers=2),
             "tiny-fp-maskgit": image}
    paths = []
    for seed, (name, fields) in enumerate(specs.items()):
        torch.manual_seed(seed)
        model = _randomized(FPMGMForMaskedGeneration(FPMGMConfig(**fields)), seed)
        path = folder / name
        if name.endswith("maskgit"):
            set_image_generation_defaults(model)
            model.save_pretrained(path)
            torch.manual_seed(seed)
            vq = VQVAEModel(VQVAEConfig(codebook_size=16, hidden_channels=8, code_dim=4))
            with torch.no_grad():  # a fresh decoder paints every code black: spread the codes over grey levels
                vq.quantizer.codebook.normal_(0, 1)
                vq.decoder.conv_out.weight.mul_(80)
                vq.decoder.conv_out.bias.fill_(0.5)
            vq.save_pretrained(path / "vq")
            (path / "image_info.json").write_text(json.dumps({"modality": "image", "num_classes": 10,
                                                               "class_names": [f"tiny {i}" for i in range(10)]}))
        else:
            model.save_pretrained(path)
            tok.save_pretrained(path)
        write_manifest(str(path))  # now over the tokenizer files too, as a training export does
        paths.append(str(path))
    return paths


@dataclass
class DemoModels:
    """The models the page serves, by name, and what went wrong loading the others."""

    models: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @classmethod
    def load(cls, paths: list[str], trust_remote_code: bool = False, log=print) -> "DemoModels":
        out = cls()
        for i, path in enumerate(paths, 1):
            log(f"[app] loading model {i}/{len(paths)}: {path}")
            try:
                loaded = load_model(path, trust_remote_code)
            except LoadError as err:
                out.problems.append(str(err))
                log(f"[app] skipped: {err}")
                continue
            while loaded.name in out.models:  # two folders with the same last name
                loaded.name += "'"
            out.models[loaded.name] = loaded
        return out

    def names(self, kind: str) -> list[str]:
        return [n for n, m in self.models.items() if m.kind == kind]

    def get(self, name, kind: str, label: str) -> LoadedModel:
        if name not in self.names(kind):
            raise SettingsError(f"{label}: pick one of {self.names(kind)} (got {name!r}).")
        return self.models[name]


# -------------------------------------------------------------------------------------------- settings


def _int(label: str, value, low: int, high: int, default: Optional[int] = None) -> int:
    """A whole number in [low, high]; a blank field gives `default` when there is one."""
    if default is not None and (value is None or (isinstance(value, str) and not value.strip())):
        return default
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, AttributeError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number) or not low <= number <= high:
        blank = " (or leave it empty)" if default is not None else ""
        raise SettingsError(f"{label}: enter a whole number from {low} to {high}{blank}; got {value!r}.")
    return int(number)


def _float(label: str, value, low: float, high: float, hint: str = "") -> float:
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, AttributeError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
        raise SettingsError(f"{label}: enter a number from {low:g} to {high:g}{hint}; got {value!r}.")
    return number


def _choice(label: str, value, choices) -> str:
    if value not in choices:
        raise SettingsError(f"{label}: pick one of {list(choices)}; got {value!r}.")
    return value


def _text(label: str, value) -> str:
    value = "" if value is None else value
    if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
        raise SettingsError(f"{label}: enter text of at most {MAX_PROMPT_CHARS} characters.")
    return value


@dataclass(frozen=True)
class Settings:
    """The sampling settings shared by both models of a comparison (and by the image tab)."""

    budget: int
    steps: Optional[int]
    reuse: str
    fp_schedule: str
    temperature: float
    seed: int
    delay_ms: int
    sampler: Optional[str] = None
    guidance_scale: Optional[float] = None

    def generate_kwargs(self) -> dict:
        kwargs = dict(budget=self.budget, num_steps=self.steps, reuse=self.reuse, fp_schedule=self.fp_schedule,
                      temperature=self.temperature, return_dict_in_generate=True)
        if self.sampler is not None:
            kwargs["sampler"] = self.sampler
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        return kwargs


def parse_settings(budget, steps, reuse, fp_schedule, temperature, seed, delay_ms, sampler=None,
                   guidance_scale=None) -> Settings:
    """Check the shared fields; raises `SettingsError` naming the first bad one."""
    try:  # 0 (greedy) or [1e-4, 1e4]: below 1e-4 the scaled log-probs overflow
        temp = _float("Temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
    except SettingsError:
        if not isinstance(temperature, (int, float, str)) or str(temperature).strip() not in ("0", "0.0"):
            raise SettingsError(f"Temperature: enter 0 (greedy) or a number from {MIN_TEMPERATURE:g} to "
                                f"{MAX_TEMPERATURE:g}; got {temperature!r}.") from None
        temp = 0.0
    return Settings(
        budget=_int("Budget (block passes)", budget, 1, MAX_BUDGET),
        steps=_int("Steps", steps, 0, MAX_STEPS, default=0) or None,
        reuse=_choice("Reuse", reuse, REUSE_MODES),
        fp_schedule=_choice("Schedule", fp_schedule, FP_SCHEDULES),
        temperature=temp,
        seed=_int("Seed", seed, 0, MAX_SEED),
        delay_ms=_int("Slow motion (ms per step)", delay_ms, 0, MAX_DELAY_MS, default=0),
        sampler=None if sampler is None else _choice("Sampler", sampler, SAMPLERS),
        guidance_scale=None if guidance_scale is None else _float("Guidance scale", guidance_scale, 0, MAX_GUIDANCE),
    )


@dataclass(frozen=True)
class TextRequest:
    prompt: str
    suffix: str
    max_new_tokens: int
    settings: Settings


def parse_text_request(prompt, suffix, max_new_tokens, **settings) -> TextRequest:
    return TextRequest(_text("Prompt", prompt), _text("Suffix", suffix),
                       _int("Max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS), parse_settings(**settings))


@dataclass(frozen=True)
class ImageRequest:
    classes: tuple
    per_class: int
    settings: Settings


def parse_image_request(loaded: LoadedModel, classes, per_class, **settings) -> ImageRequest:
    names = loaded.class_names
    picked = [classes] if isinstance(classes, str) else list(classes or [])
    if not picked or any(c not in names for c in picked):
        raise SettingsError(f"Classes: tick at least one of {list(names)}; got {classes!r}.")
    ids = tuple(names.index(c) for c in picked)
    return ImageRequest(ids, _int("Samples per class", per_class, 1, MAX_PER_CLASS), parse_settings(**settings))


def step_plan(loaded: LoadedModel, settings: Settings) -> list[int]:
    """The fixed-point iterations of every step of a block, as `generate` will plan them; a budget that cannot
    pay for the steps is a `SettingsError` naming the fields."""
    pre, fp, post = loaded.layers
    per_step = getattr(loaded.model.generation_config, "fp_iters_per_step", 4)
    try:
        return plan_budget(settings.budget, settings.steps, pre, fp, post, settings.fp_schedule, per_step)
    except ValueError as err:
        raise SettingsError(f"Budget / Steps for {loaded.name}: {err}") from None


# -------------------------------------------------------------------------------------------- running


class _Stopped(Exception):
    """Raised in the worker's callback when the page went away or pressed Stop."""


@dataclass
class Frame:
    """The canvas (row-major ids of every sample) after `step` of `total` steps, and the canvas shown before."""

    step: int
    total: int
    canvas: torch.Tensor
    previous: torch.Tensor
    live: list  # (mean iterations, mean residual) per step so far; (None, None) where the step made no call


@dataclass
class RunResult:
    """One finished `generate` call and the numbers the page shows."""

    name: str
    canvas: torch.Tensor
    initial: torch.Tensor
    iterations: list  # per step, mean over samples; None where no call ran (the cache skipped the step)
    residuals: list  # per step, mean over samples; None where no call ran
    allotted: list  # fixed-point iterations the plan gave each step
    block_passes: int
    nfe: int
    num_steps: int
    num_blocks: int
    budget: Optional[int]
    wall_s: float
    diverged: int
    cold_starts: int


def _mean(values: torch.Tensor) -> Optional[float]:
    values = values.float()
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else None


def _result(name, out, initial, wall_s) -> RunResult:
    stats = out.step_stats
    ran = [s["ran"] for s in stats]
    return RunResult(
        name=name,
        canvas=out.sequences.cpu(),
        initial=initial,
        iterations=[_mean(s["iterations"][r]) if r.any() else None for s, r in zip(stats, ran, strict=True)],
        residuals=[_mean(s["residual"][r]) if r.any() else None for s, r in zip(stats, ran, strict=True)],
        allotted=[s["fp_iters"] for s in stats],
        block_passes=int(out.block_passes.max()),
        nfe=int(out.nfe.max()),
        num_steps=int(out.num_steps),
        num_blocks=int(out.num_blocks),
        budget=out.budget,
        wall_s=wall_s,
        diverged=sum(int(s["diverged"].any()) for s in stats),
        cold_starts=sum(int(s["cold_start"].any()) for s in stats),
    )


def _stream(loaded: LoadedModel, call, initial: torch.Tensor, total: int, delay_s: float,
            stop: threading.Event) -> Iterator[Union[Frame, RunResult]]:
    """Run `call(callback)` (one `generate`) in a worker thread and yield a `Frame` per shown step, then the
    `RunResult`. The consumer paces the frames (`delay_s` apart at least) without slowing the worker, and skips
    to the newest canvas when it falls behind. Closing the iterator stops the worker at its next step."""
    events: queue.Queue = queue.Queue()
    worker_id: list = []
    last_call: dict = {}

    def hook(module, args, output):  # one network call of the worker: the solver's live numbers
        if worker_id and threading.get_ident() == worker_id[0] and output.solver_stats is not None:
            s = output.solver_stats
            last_call["stats"] = (_mean(s.iterations), _mean(s.residual))

    def callback(step, canvas):
        if stop.is_set():
            raise _Stopped
        events.put(("step", canvas.detach().cpu().clone(), last_call.pop("stats", (None, None))))

    def work():
        worker_id.append(threading.get_ident())
        start = time.perf_counter()
        try:
            out = call(callback)
            events.put(("done", _result(loaded.name, out, initial, time.perf_counter() - start), None))
        except _Stopped:
            events.put(("stopped", None, None))
        except BaseException as err:  # handed to the page's thread, which reports it
            events.put(("error", err, None))

    handle = loaded.model.model.register_forward_hook(hook)  # the denoiser body: what generate calls
    worker = threading.Thread(target=work, name=f"generate-{loaded.name}", daemon=True)
    worker.start()
    try:
        yield from _frames(events, initial, total, delay_s)
    finally:
        stop.set()
        worker.join(timeout=5)  # a step in flight finishes on its own; the hook below ignores it
        handle.remove()


def _frames(events: queue.Queue, initial, total, delay_s) -> Iterator[Union[Frame, RunResult]]:
    shown, live, last, held = initial, [], 0.0, []
    while True:
        kind, payload, stats = held.pop() if held else events.get()
        if kind == "step":
            live.append(stats)
            while delay_s == 0:  # fallen behind with no pacing asked: skip to the newest canvas
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    break
                if event[0] != "step":
                    held.append(event)
                    break
                payload = event[1]
                live.append(event[2])
            time.sleep(max(0.0, delay_s - (time.perf_counter() - last)))
            last = time.perf_counter()
            yield Frame(len(live), max(total, len(live)), payload, shown, list(live))
            shown = payload
        elif kind == "done":
            yield payload
            return
        elif kind == "stopped":
            return
        else:
            raise payload


def text_canvas(loaded: LoadedModel, request: TextRequest) -> tuple[dict, torch.Tensor]:
    """`generate` inputs and the canvas before the first step: prompt + masks (+ suffix: infilling)."""
    tok, mask = loaded.tokenizer, loaded.model.config.mask_token_id
    prompt = tok(request.prompt, add_special_tokens=False)["input_ids"] if request.prompt else []
    suffix = tok(request.suffix, add_special_tokens=False)["input_ids"] if request.suffix else []
    bos = getattr(loaded.model.generation_config, "bos_token_id", None)
    bos = tok.bos_token_id if bos is None else bos
    if not prompt and not suffix and bos is not None:
        prompt = [bos]  # an empty prompt starts at a document boundary, as in the packed training data
    if suffix:  # infilling: the gap is part of the canvas, which must fit the model
        ids = prompt + [mask] * request.max_new_tokens + suffix
        window = loaded.model.config.max_position_embeddings
        if len(ids) > window:
            raise SettingsError(f"Max new tokens / Suffix: prompt ({len(prompt)}) + gap ({request.max_new_tokens}) "
                                f"+ suffix ({len(suffix)}) = {len(ids)} tokens; {loaded.name} fits {window}.")
        return {"input_ids": torch.tensor([ids])}, torch.tensor(ids)
    if not prompt:
        return {"max_new_tokens": request.max_new_tokens}, torch.full((request.max_new_tokens,), mask)
    inputs = {"input_ids": torch.tensor([prompt]), "max_new_tokens": request.max_new_tokens}
    return inputs, torch.tensor(prompt + [mask] * request.max_new_tokens)


def stream_text(loaded: LoadedModel, request: TextRequest, stop: Optional[threading.Event] = None):
    """Frames of one text run, then its `RunResult` (`.canvas` is `(1, L)`)."""
    settings = request.settings
    plan = step_plan(loaded, settings)
    inputs, initial = text_canvas(loaded, request)
    masked = (initial == loaded.model.config.mask_token_id).nonzero()
    start = int(masked[0, 0]) if masked.numel() else len(initial)
    blocks = plan_blocks(start, len(initial), None, loaded.model.config.max_position_embeddings)
    generator = torch.Generator().manual_seed(settings.seed)

    def call(callback):
        return loaded.model.generate(**inputs, **settings.generate_kwargs(), generator=generator, callback=callback)

    yield from _stream(loaded, call, initial[None], len(plan) * max(1, len(blocks)), settings.delay_ms / 1000,
                       stop or threading.Event())


def stream_images(loaded: LoadedModel, request: ImageRequest, stop: Optional[threading.Event] = None):
    """Frames of one class-conditional image run (`per_class` samples of every class, adjacent), then its result."""
    settings = request.settings
    plan = step_plan(loaded, settings)
    labels = torch.tensor(request.classes)
    rows = len(request.classes) * request.per_class
    initial = torch.full((rows, loaded.model.config.max_position_embeddings), loaded.model.config.mask_token_id)
    generator = torch.Generator().manual_seed(settings.seed)

    def call(callback):
        return loaded.model.generate(batch_size=len(request.classes), class_labels=labels,
                                     num_return_sequences=request.per_class, **settings.generate_kwargs(),
                                     generator=generator, callback=callback)

    yield from _stream(loaded, call, initial, len(plan), settings.delay_ms / 1000, stop or threading.Event())
