"""Generative perplexity of generated text under a causal eval LM (FP-MGM paper Eq. 4), as an `evaluate` metric.

Load by path, offline: ``evaluate.load(fpmgm_hf.evaluation.evaluate_module("generative_perplexity"))``
(``"metrics/generative_perplexity"`` in a checkout). Thin wrapper of
``fpmgm_hf.evaluation.metrics.generative_perplexity`` / ``load_eval_lm``.
"""

import datasets
import evaluate

from fpmgm_hf.evaluation.metrics import _is_gpt2_large, generative_perplexity, load_eval_lm

_DESCRIPTION = """
Generative perplexity: decoded samples are re-tokenised for a causal eval LM (gpt2-large in the paper
and MDLM), and each sample's mean token NLL is computed. `gen_ppl` = exp(mean over samples of the
per-sample mean NLL) is the paper's Eq. 4. `pooled_ppl` = exp(total NLL / total tokens) is MDLM's
token-weighted variant. They coincide when all samples have the same token count. Without Hub access
the eval LM falls back (with a warning) to the offline SmolLM2-135M-Instruct GGUF. Its numbers are
relative only, and the output's `eval_lm["comparable_to_published"]` says so. Always report the
unigram entropy (metrics/unigram_entropy) and the sampling dtype alongside.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): decoded generated samples.
    model_id (str): eval LM to load when `model` is not given (default "gpt2-large"; offline fallback).
    model, tokenizer (optional): an already loaded causal LM and its tokenizer (e.g. from
        `fpmgm_hf.evaluation.metrics.load_eval_lm`); loaded models are cached on the metric instance.
    eval_info (dict, optional): the `info` from `load_eval_lm` for an injected model.
    batch_size (int): default 8. max_length (int): context window, default 1024.
    add_bos (bool or None): prepend the eval tokenizer's BOS so the first token is scored (None: if it has one).
    device (str, optional): defaults to the model's device.
Returns:
    gen_ppl, pooled_ppl, mean_nll, pooled_nll, per_sample_nll, per_sample_num_tokens, num_tokens,
    num_samples, num_skipped, add_bos, eval_lm (dict with name and comparable_to_published).
Examples:
    >>> metric = evaluate.load("metrics/generative_perplexity")
    >>> metric.compute(predictions=["The cat sat on the mat."])["gen_ppl"]  # doctest: +SKIP
"""

_CITATION = """
@article{fpmgm2026, title={Fixed-Point Masked Generative Modeling}, journal={arXiv:2605.31215}, year={2026}}
@inproceedings{sahoo2024mdlm, title={Simple and Effective Masked Diffusion Language Models},
  booktitle={NeurIPS}, year={2024}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerativePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id="gpt2-large", model=None, tokenizer=None, eval_info=None,
                 batch_size=8, max_length=1024, add_bos=None, device=None):
        if model is None:
            cache = self.__dict__.setdefault("_eval_lm_cache", {})
            if model_id not in cache:
                cache[model_id] = load_eval_lm(model_id)
            model, tokenizer, eval_info = cache[model_id]
        elif tokenizer is None:
            raise ValueError("pass the eval tokenizer together with `model`")
        elif eval_info is None:
            config = getattr(model, "config", None)
            eval_info = {"name": getattr(config, "_name_or_path", None) or type(model).__name__,
                         "source": "injected", "fallback": False,
                         "comparable_to_published": _is_gpt2_large(config)}
        return generative_perplexity(list(predictions), model, tokenizer, batch_size=batch_size,
                                     max_length=max_length, device=device, add_bos=add_bos, eval_info=eval_info)
