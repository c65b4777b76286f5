"""Pipelines shipped with every saved model folder (declared in `config.custom_pipelines`), so that
`transformers.pipeline(model=folder, trust_remote_code=True)` works without fpmgm_hf installed:

- text models: `pipeline("text-generation", ...)("ROMEO:", max_new_tokens=32)` -> [{"generated_text": ...}];
  mask tokens in the prompt are infilled as well.
- image models (`config.grid_size` set): `pipeline("image-generation", ...)(class_labels=[0, 3], budget=48)`,
  or `FPMGMImagePipeline.from_pretrained(folder)`, in the diffusers style: the FP-MaskGIT model samples token
  grids, the VQ tokenizer (the folder's `vq/` subfolder) decodes them, and the output holds PIL images.

Hub-portable: imports only torch, transformers, the standard library and sibling files (Pillow lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import Pipeline
from transformers.utils import ModelOutput

from .modeling_vqvae import VQVAEModel

TEXT_TASK, IMAGE_TASK = "text-generation", "image-generation"
OUTPUT_TYPES = ("pil", "pt", "np")


def custom_pipelines(config) -> dict:
    """The `config.custom_pipelines` entry of a model: image pipeline for grid (image) models, else text."""
    if getattr(config, "grid_size", None) is not None:
        return {IMAGE_TASK: {"impl": "pipeline_fpmgm.FPMGMImagePipeline", "pt": ["AutoModel"], "type": "image"}}
    return {TEXT_TASK: {"impl": "pipeline_fpmgm.FPMGMTextGenerationPipeline", "pt": ["AutoModelForMaskedLM"],
                        "type": "text"}}


class FPMGMTextGenerationPipeline(Pipeline):
    """Prompt text -> generated text through `model.generate` (every generate argument is accepted per call).

    Without `max_new_tokens` / `max_length` (argument or generation config) and without mask tokens in the
    prompt, `DEFAULT_MAX_NEW_TOKENS` tokens are appended. `return_full_text` (True) decodes the whole sequence,
    else only what follows the prompt; `return_tensors=True` returns the token ids instead of text.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False
    DEFAULT_MAX_NEW_TOKENS = 32

    def _sanitize_parameters(
        self, return_full_text=None, return_tensors=None, skip_special_tokens=None, add_special_tokens=None, **kwargs
    ):
        pre = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        post = {"return_full_text": return_full_text, "return_tensors": return_tensors,
                "skip_special_tokens": skip_special_tokens}
        return pre, kwargs, {k: v for k, v in post.items() if v is not None}

    def preprocess(self, prompt, add_special_tokens: bool = False):
        if not isinstance(prompt, str):
            raise ValueError(f"the text-generation pipeline takes a string prompt, got {type(prompt).__name__}.")
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
        return {"input_ids": enc["input_ids"]}

    def _forward(self, model_inputs, **generate_kwargs):
        ids = model_inputs["input_ids"]
        gen = self.model.generation_config
        lengths = ("max_new_tokens", "max_length", "gen_length")
        has_masks = bool((ids == self.model.config.mask_token_id).any())
        if not has_masks and not any(k in generate_kwargs for k in lengths) and not any(
            getattr(gen, k, None) is not None for k in lengths[:2]
        ):
            generate_kwargs["max_new_tokens"] = self.DEFAULT_MAX_NEW_TOKENS
        out = self.model.generate(ids, return_dict_in_generate=True, **generate_kwargs)
        return {"sequences": out.sequences, "prompt_length": torch.tensor(ids.shape[1])}

    def postprocess(self, model_outputs, return_full_text=True, return_tensors=False, skip_special_tokens=True):
        start = 0 if return_full_text else int(model_outputs["prompt_length"])
        results = []
        for seq in model_outputs["sequences"]:
            if return_tensors:
                results.append({"generated_token_ids": seq[start:].tolist()})
            else:
                text = self.tokenizer.decode(seq[start:], skip_special_tokens=skip_special_tokens)
                results.append({"generated_text": text})
        return results


@dataclass
class FPMGMImagePipelineOutput(ModelOutput):
    """Output of [`FPMGMImagePipeline`] (diffusers' `ImagePipelineOutput` plus the sampling record).

    images: list of `PIL.Image` (output_type "pil"), float tensor `(N, C, H, W)` in [0, 1] ("pt"), or uint8
        array `(N, H, W, C)` ("np").
    token_ids (`LongTensor (N, rows*cols)`): the sampled token grids.
    block_passes (`LongTensor (N,)`): transformer-block passes spent per image.
    """

    images: Any = None
    token_ids: Optional[torch.Tensor] = None
    block_passes: Optional[torch.Tensor] = None


def _to_pil(images: torch.Tensor) -> list:
    try:
        from PIL import Image
    except ImportError:  # Pillow is optional: only output_type="pil" needs it
        raise ImportError("output_type='pil' needs Pillow (`pip install Pillow`); use 'pt' or 'np'.") from None
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # (N, H, W, C)
    if pixels.shape[-1] not in modes:
        raise ValueError(f"cannot make PIL images with {pixels.shape[-1]} channels; use output_type='pt'.")
    mode = modes[pixels.shape[-1]]
    return [Image.frombytes(mode, (p.shape[1], p.shape[0]), bytes(p.flatten().tolist())) for p in pixels]


class FPMGMImagePipeline(Pipeline):
    """Class labels + budget -> images: FP-MaskGIT (`model`) samples token grids with `generate`, the VQ
    tokenizer (`vqvae`) decodes them. `vqvae` defaults to the model folder's `vq/` subfolder.

    Call: `pipe(class_labels, budget=None, num_steps=None, guidance_scale=None, generator=None,
    output_type="pil", return_dict=True, **generate_kwargs)`; one `generate` call for all labels.
    """

    _load_tokenizer = False
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, vqvae=None, **kwargs):
        super().__init__(model, **kwargs)
        if vqvae is None or isinstance(vqvae, (str, os.PathLike)):
            source = vqvae if vqvae is not None else model.name_or_path
            sub = {} if vqvae is not None else {"subfolder": "vq"}
            if not source:
                raise ValueError("`vqvae` is required: the model was not loaded from a folder with a `vq/` tokenizer.")
            vqvae = VQVAEModel.from_pretrained(source, **sub)
        self.vqvae = vqvae.to(self.device).eval()

    @classmethod
    def from_pretrained(cls, folder, vqvae=None, device=None, **model_kwargs):
        """Load the model folder (and its `vq/` tokenizer) with this folder's own code, diffusers style."""
        from .modeling_fpmgm import FPMGMForMaskedGeneration

        model = FPMGMForMaskedGeneration.from_pretrained(folder, **model_kwargs)
        return cls(model=model, vqvae=vqvae, device=-1 if device is None else device, task=IMAGE_TASK)

    def __call__(self, class_labels=None, **kwargs):
        if class_labels is None:
            raise ValueError("`class_labels` is required: the class of every image to generate.")
        pre, forward, post = self._sanitize_parameters(**kwargs)
        forward = {**self._forward_params, **forward}
        post = {**self._postprocess_params, **post}
        return self.run_single(class_labels, pre, forward, post)

    def _sanitize_parameters(self, output_type=None, return_dict=None, **generate_kwargs):
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type`={output_type!r} is invalid; allowed: {list(OUTPUT_TYPES)}.")
        post = {k: v for k, v in (("output_type", output_type), ("return_dict", return_dict)) if v is not None}
        return {}, generate_kwargs, post

    def preprocess(self, class_labels):
        labels = torch.as_tensor(class_labels)
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex() or labels.dim() > 1:
            raise ValueError(f"`class_labels` must be an integer class id or a list of them, got {class_labels!r}.")
        labels = labels.long().reshape(-1)
        if labels.numel() == 0:
            raise ValueError("`class_labels` is empty: pass at least one class id.")
        return {"class_labels": labels}

    def _forward(self, model_inputs, **generate_kwargs):
        labels = model_inputs["class_labels"]
        out = self.model.generate(
            batch_size=labels.shape[0], class_labels=labels, return_dict_in_generate=True, **generate_kwargs
        )
        n = out.sequences.shape[0]  # labels x num_return_sequences
        return {"images": self.vqvae.decode(out.sequences), "token_ids": out.sequences.reshape(n, -1),
                "block_passes": out.block_passes}

    def postprocess(self, model_outputs, output_type="pil", return_dict=True):
        images = model_outputs["images"]
        if output_type == "pil":
            images = _to_pil(images)
        elif output_type == "np":
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = FPMGMImagePipelineOutput(
            images=images, token_ids=model_outputs["token_ids"], block_passes=model_outputs["block_passes"]
        )
        return out if return_dict else (images,)
