"""[`FPMGMGenerationConfig`]: the settings of `generate`, their bounds, and the Dream / LLaDA / transformers
argument names they answer to.

Hub-portable: imports only torch, transformers, the standard library and sibling files.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import GenerationConfig

from .scheduling_fpmgm import CONFIDENCE_ALGS, FP_SCHEDULES, MAX_BUDGET, MAX_FP_ITERS_PER_STEP, MAX_NUM_STEPS

SAMPLERS = ("ancestral", "confidence")
REUSE_MODES = ("3sr", "full", "none")
ORDERS = ("confidence", "halton")
MASK_SCHEDULES = ("cosine", "linear", "arccos")
# Upper bounds that keep every call fast to answer (documented in docs/generation.md).
MAX_NEW_TOKENS = 1 << 20
MAX_BATCH_SIZE = 1 << 16  # rows per call: batch_size (or input rows) x num_return_sequences
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4  # below 1e-4 the scaled log-probs overflow: use 0 (greedy)
MAX_NOISE = 1e4  # randomness, alg_temp
MAX_GUIDANCE_SCALE = 1e3

# name -> default; every field can be overridden per `generate` call.
_FIELDS: dict[str, Any] = {
    "batch_size": 1,
    "seq_len": None,
    "max_new_tokens": None,
    "max_length": None,
    "num_return_sequences": 1,
    "block_length": None,
    "num_steps": None,
    "budget": None,
    "fp_iters_per_step": 4,
    "fp_schedule": "decreasing",
    "fp_tol": None,
    "sampler": "ancestral",
    "alg": None,
    "alg_temp": 0.0,
    "reuse": "3sr",
    "gamma_mask_min": 0.75,
    "gamma_mask_max": 0.90,
    "gamma_changed": 0.2,
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "noise_eps": 1e-3,
    "time_eps": 0.0,
    "mask_schedule": "cosine",
    "randomness": 0.0,
    "order": "confidence",
    "guidance_scale": None,
    "use_cache": True,
    "return_dict_in_generate": False,
    "output_history": False,
    "output_solver_trace": False,
    "progress_bar": False,
    "mask_token_id": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
_META = ("_commit_hash", "_from_model_config", "transformers_version")

# Other libraries' names for our fields (Dream `steps`, LLaDA `gen_length`).
ALIASES = {"steps": "num_steps", "gen_length": "max_new_tokens", "eps": "time_eps"}
# Names whose value sets several of our fields (LLaDA `remasking`).
REMASKING = {
    "low_confidence": {"sampler": "confidence", "alg": "maskgit_plus"},
    "random": {"sampler": "confidence", "alg": "origin"},
}
ACCEPTED_NAMES = sorted(set(_FIELDS) | set(ALIASES) | {"remasking", "do_sample"})

# (name, lowest, highest, None allowed) for the integer fields.
_INTS = (
    ("batch_size", 1, MAX_BATCH_SIZE, False),
    ("num_return_sequences", 1, MAX_BATCH_SIZE, False),
    ("fp_iters_per_step", 1, MAX_FP_ITERS_PER_STEP, False),
    ("seq_len", 1, None, True),
    ("max_new_tokens", 1, MAX_NEW_TOKENS, True),
    ("max_length", 1, MAX_NEW_TOKENS, True),
    ("block_length", 1, None, True),
    ("num_steps", 1, MAX_NUM_STEPS, True),
    ("budget", 1, MAX_BUDGET, True),
    ("top_k", 1, None, True),
    ("mask_token_id", 0, None, True),
    ("pad_token_id", 0, None, True),
    ("bos_token_id", 0, None, True),
)
# (name, low, high, low excluded, high excluded, None allowed) for the float fields; every value must be finite.
_FLOATS = (
    ("randomness", 0, MAX_NOISE, False, False, False),
    ("alg_temp", 0, MAX_NOISE, False, False, False),
    ("fp_tol", 0, math.inf, True, True, True),
    ("guidance_scale", 0, MAX_GUIDANCE_SCALE, False, False, True),
    ("top_p", 0, 1, True, False, True),
    ("noise_eps", 0, 1, True, True, False),
    ("time_eps", 0, 1, False, True, False),
    ("gamma_mask_min", 0, 1, False, False, False),
    ("gamma_mask_max", 0, 1, False, False, False),
    ("gamma_changed", 0, 1, False, False, False),
)
_CHOICES = (
    ("sampler", SAMPLERS),
    ("reuse", REUSE_MODES),
    ("fp_schedule", FP_SCHEDULES),
    ("order", ORDERS),
    ("mask_schedule", MASK_SCHEDULES),
)
_BOOLS = ("use_cache", "return_dict_in_generate", "output_history", "output_solver_trace", "progress_bar")


def _bad(name, value, allowed):
    raise ValueError(f"`{name}`={value!r} is invalid; allowed: {allowed}.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve_aliases(kwargs: dict) -> dict:
    """Rewrite Dream / LLaDA / transformers names into our field names; raises `ValueError` on a conflict.

    `steps` -> `num_steps`, `gen_length` -> `max_new_tokens`, `remasking` -> `sampler` + `alg`, and
    `do_sample=False` -> `temperature=0`. `alg` without `sampler` picks the sampler as Dream does: "origin" is
    the ancestral (MDLM) step, the other algs rank positions in the confidence sampler.
    """
    out = dict(kwargs)

    def put(name, value, source):
        if name in out and out[name] != value:
            raise ValueError(f"`{source}` conflicts with `{name}`={out[name]!r}; pass only one of them.")
        out[name] = value

    for alias, name in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            put(name, value, f"{alias}={value!r}")
    if "remasking" in out:
        value = out.pop("remasking")
        if not isinstance(value, str) or value not in REMASKING:
            _bad("remasking", value, sorted(REMASKING))
        for name, mapped in REMASKING[value].items():
            put(name, mapped, f"remasking={value!r}")
    if "do_sample" in out:
        value = out.pop("do_sample")
        if not isinstance(value, bool):
            _bad("do_sample", value, "True or False")
        if value is False:
            put("temperature", 0.0, "do_sample=False")
        elif out.get("temperature") == 0:
            raise ValueError("`do_sample=True` conflicts with `temperature`=0 (greedy); pass only one of them.")
    if out.get("alg") is not None and "sampler" not in out:
        out["sampler"] = "ancestral" if out["alg"] == "origin" else "confidence"
    return out


class FPMGMGenerationConfig(GenerationConfig):
    r"""Generation settings of [`FPMGMGenerationMixin.generate`]; saved as `generation_config.json`.

    Args:
        batch_size / seq_len: size of an all-masked canvas when neither `input_ids` nor a length is given.
        max_new_tokens (`int`): masks appended after the prompt (or after `bos_token_id` without a prompt).
            `max_length`: the same as a total length (prompt included); `max_new_tokens` wins.
        num_return_sequences (`int`, 1): samples per input row (rows of one input are adjacent).
        block_length (`int`): decode the generated region in blocks of this many tokens, left to right
            (LLaDA semi-autoregressive). Sequences longer than `max_position_embeddings` use blocks of half of it.
        num_steps (`int`): denoising steps T per block (chosen from the budget when None).
        budget (`int`): transformer-block passes per sample and block; each step costs K_pre + n_i K_fp + K_post.
        fp_iters_per_step (`int`, 4): iterations per step without a budget, and the target average when
            T is chosen automatically.
        fp_schedule (`str`, "decreasing"): allocation of iterations across steps, one of
            decreasing / fixed / increasing / cosine / front_loaded.
        fp_tol (`float`): adaptive stopping: per-sample relative-residual tolerance. Iterations it saves are
            reported (`block_passes` below the budget), not re-spent.
        sampler (`str`, "ancestral"): "ancestral" (MDLM reverse step = Dream's "origin") or "confidence" (MaskGIT).
        alg (`str`): how the confidence sampler ranks positions (Dream): maskgit_plus (default) / topk_margin /
            entropy / origin (random order). alg_temp (`float`, 0): Dream's sampling of positions.
        reuse (`str`, "3sr"): warm start of each step's solver: "3sr", "full" (previous z*) or "none" (h_pre).
        gamma_mask_min / gamma_mask_max / gamma_changed: the 3SR weights (0.75 / 0.90 / 0.2).
        temperature / top_k / top_p: token filtering (temperature 0 = greedy, else in [1e-4, 1e4]).
        noise_eps (`float`, 1e-3): epsilon of the log-linear schedule.
        time_eps (`float`, 0; Dream's `eps`): the denoising times run from 1 down to `time_eps` (the last step
            reveals whatever is left).
        mask_schedule (`str`, "cosine"), randomness (`float`, 0), order (`str`, "confidence"): MaskGIT
            schedule, annealed Gumbel noise on confidences, and reveal order ("halton" for images).
        guidance_scale (`float`): classifier-free guidance against the null class (needs `class_labels`).
        use_cache (`bool`, True): run the network only for rows with a token to draw at a step (reveal-first:
            a step that reveals nothing in a row costs nothing, exact with or without time conditioning). False: every
            row with a masked position at every step (to follow the solver across all steps).
        return_dict_in_generate / output_history: return an [`FPMGMGenerationOutput`], with canvases.
        output_solver_trace (`bool`, False): add each sample's residual per iteration to `step_stats`.
        progress_bar (`bool`, False): a tqdm bar over the denoising steps (a real-shape call takes minutes on a CPU).
        mask_token_id: defaults to the model config's. eos_token_id (`int` or list): after the first generated
            EOS every generated position becomes `pad_token_id` (default: the first EOS id). bos_token_id:
            starts the canvas when `max_new_tokens` is given without `input_ids`.
    """

    def __init__(self, **kwargs):
        # Deliberately no super().__init__(): GenerationConfig's autoregressive fields do not apply here.
        kwargs = resolve_aliases(kwargs)
        for name, default in _FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        for name in _META:
            setattr(self, name, kwargs.pop(name, None))
        if kwargs:
            raise ValueError(f"unknown generation options {sorted(kwargs)}; valid options: {ACCEPTED_NAMES}.")
        self.validate()

    def validate(self, *args, **kwargs):
        # An attribute set by hand (e.g. `config.num_beams = 4`) would be saved and then refused at load time.
        stray = sorted(k for k in vars(self) if not k.startswith("_") and k not in _FIELDS and k not in _META)
        if stray:
            raise ValueError(f"generation options this model cannot use: {stray}; valid options: {ACCEPTED_NAMES}.")
        self._validate_numbers()
        for name, allowed in _CHOICES:
            if getattr(self, name) not in allowed:
                _bad(name, getattr(self, name), list(allowed))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "True or False")
        if self.gamma_mask_min > self.gamma_mask_max:
            _bad("gamma_mask_min", self.gamma_mask_min, f"a value <= gamma_mask_max={self.gamma_mask_max}")
        t = self.temperature
        if not _is_number(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            _bad("temperature", t, f"0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        self._validate_token_ids()
        self._validate_alg()

    def _validate_numbers(self):
        for name, low, high, allow_none in _INTS:
            v = getattr(self, name)
            if v is None and allow_none:
                continue
            if not _is_int(v) or v < low or (high is not None and v > high):
                top = "inf" if high is None else high
                _bad(name, v, f"an integer in [{low}, {top}]" + " or None" * allow_none)
        for name, low, high, low_open, high_open, allow_none in _FLOATS:
            v = getattr(self, name)
            if v is None and allow_none:
                continue
            ok = _is_number(v) and math.isfinite(v) and (v > low if low_open else v >= low)
            if not ok or (v >= high if high_open else v > high):
                _bad(name, v, f"a finite number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")

    def _validate_token_ids(self):
        eos = self.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        if eos is not None and (not ids or not all(_is_int(i) and i >= 0 for i in ids)):
            _bad("eos_token_id", eos, "None, a token id >= 0 or a non-empty list of them")

    def _validate_alg(self):
        if self.alg is not None and self.alg not in CONFIDENCE_ALGS:
            _bad("alg", self.alg, [None, *CONFIDENCE_ALGS])
        if self.sampler == "ancestral" and self.alg not in (None, "origin"):
            _bad("alg", self.alg, "None or 'origin' with sampler='ancestral' (the others rank sampler='confidence')")
        if self.alg_temp > 0 and self.sampler != "confidence":
            _bad("alg_temp", self.alg_temp, "0 unless sampler='confidence'")
        if self.order == "halton" and (self.alg is not None or self.alg_temp > 0):
            _bad("order", self.order, "'confidence' when `alg` / `alg_temp` rank positions (halton is a fixed order)")

    @property
    def eos_ids(self) -> list[int]:
        """`eos_token_id` as a list (empty when unset)."""
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def to_diff_dict(self) -> dict[str, Any]:
        # Compare against our own defaults, not GenerationConfig's (whose top_k=50 would be dropped).
        keep = lambda k, v: k == "transformers_version" or _FIELDS.get(k, object()) != v  # noqa: E731
        return {k: v for k, v in self.to_dict().items() if keep(k, v)}

    def save_pretrained(self, *args, **kwargs):
        self.validate()  # nothing this model would refuse at load time is written
        return super().save_pretrained(*args, **kwargs)

    def get_generation_mode(self, *args, **kwargs):
        raise NotImplementedError("FPMGMGenerationConfig has no autoregressive generation mode.")

    @classmethod
    def from_model_config(cls, *args, **kwargs):
        # PreTrainedModel.__init__ falls back to `cls()` on NotImplementedError (pitfall P1).
        raise NotImplementedError("FPMGMGenerationConfig is not derived from the model config.")


def merge_generation_config(base: FPMGMGenerationConfig, generation_config, kwargs: dict) -> FPMGMGenerationConfig:
    """The settings of one `generate` call: `generation_config` (ours, a plain `GenerationConfig` whose
    user-set fields are translated, or a dict) over `base`, then the call's keyword arguments.

    Raises `ValueError` naming `generation_config` for any other type or an untranslatable field.
    """
    if isinstance(generation_config, FPMGMGenerationConfig):
        cfg, given = copy.deepcopy(generation_config), {}
    elif isinstance(generation_config, GenerationConfig):
        cfg = copy.deepcopy(base)
        given = {k: v for k, v in generation_config.to_diff_dict().items() if k not in _META}
    elif isinstance(generation_config, dict):
        cfg, given = copy.deepcopy(base), dict(generation_config)
    elif generation_config is None:
        cfg, given = copy.deepcopy(base), {}
    else:
        raise ValueError(
            f"`generation_config` must be an FPMGMGenerationConfig, a transformers GenerationConfig or a dict; "
            f"got {type(generation_config).__name__}."
        )
    try:
        given = resolve_aliases(given)
    except ValueError as err:
        raise ValueError(f"`generation_config`: {err}") from None
    unknown = sorted(set(given) - set(_FIELDS))
    if unknown:
        raise ValueError(f"`generation_config` has fields this model cannot use: {unknown}; valid: {ACCEPTED_NAMES}.")
    call = resolve_aliases(kwargs)
    unknown = sorted(set(call) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown generate() arguments {unknown}; valid options: {ACCEPTED_NAMES}.")
    for key, value in {**given, **call}.items():
        setattr(cfg, key, value)
    cfg.validate()
    if "do_sample" in kwargs and kwargs["do_sample"] is True and cfg.temperature == 0:
        raise ValueError("`do_sample=True` needs `temperature` > 0, but the generation config is greedy (0).")
    return cfg
