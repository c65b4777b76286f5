"""Unigram entropy of generated token sequences (FP-MGM paper Eq. 5), as an `evaluate` metric.

Load by path, offline: ``evaluate.load(fpmgm_hf.evaluation.evaluate_module("unigram_entropy"))``
(``"metrics/unigram_entropy"`` in a checkout). Thin wrapper of
``fpmgm_hf.evaluation.metrics.unigram_entropy``.
"""

import math

import datasets
import evaluate

from fpmgm_hf.evaluation.metrics import unigram_entropy

_DESCRIPTION = """
Per-sample entropy (nats) of the empirical token distribution of each generated sequence,
H = -sum_v p_v log p_v with p_v the frequency of token v in the sample, averaged over samples
(FP-MGM paper Eq. 5; MDLM/DUO `record_entropy`). Low values flag repetitive, low-temperature samples;
real OpenWebText at length 1024 sits around 5.6. Report it next to every generative perplexity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): generated token ids, one list per sample (lengths may differ).
    ignore_ids (list of int, optional): ids dropped before counting, e.g. padding or unfilled mask ids.
Returns:
    entropy (float): mean of the per-sample entropies (samples left empty by `ignore_ids` are skipped).
    per_sample_entropy (list of float): entropy of each sample (NaN for an empty sample).
Examples:
    >>> metric = evaluate.load("metrics/unigram_entropy")
    >>> metric.compute(predictions=[[1, 1, 2, 2]])["entropy"]  # log(2)
    0.6931471805599453
"""

_CITATION = """
@article{fpmgm2026, title={Fixed-Point Masked Generative Modeling}, journal={arXiv:2605.31215}, year={2026}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UnigramEntropy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions, ignore_ids=None):
        per_sample = unigram_entropy(predictions, ignore_ids=ignore_ids)
        valid = per_sample[~per_sample.isnan()]
        mean = float(valid.mean()) if len(valid) else math.nan
        return {"entropy": mean, "per_sample_entropy": per_sample.tolist()}
