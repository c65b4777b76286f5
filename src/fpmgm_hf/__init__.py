"""fpmgm_hf: Fixed-Point Masked Generative Models (FP-MDLM, FP-MaskGIT, CoFRe) for Hugging Face.

Importing the package registers `FPMGMConfig` / `FPMGMForMaskedGeneration` with the Auto classes, so
`AutoModel.from_pretrained(path)` works without `trust_remote_code` when fpmgm_hf is installed; saved
folders also carry the model files for `trust_remote_code=True` loading without it.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_fpmgm import FPMGMConfig
from .generation_fpmgm import FPMGMGenerationConfig, FPMGMGenerationMixin, FPMGMGenerationOutput
from .modeling_fpmgm import (
    FPMGMForMaskedGeneration,
    FPMGMModel,
    FPMGMModelOutput,
    FPMGMOutput,
    FPMGMPreTrainedModel,
    WarmStart,
)
from .pipeline_fpmgm import FPMGMImagePipeline, FPMGMImagePipelineOutput, FPMGMTextGenerationPipeline
from .solver_fpmgm import SolverStats, anderson, get_solver, picard
from .vq import VQVAEConfig, VQVAEModel, VQVAEOutput  # importing registers the VQ tokenizer's Auto classes

__version__ = "0.1.0"

AutoConfig.register("fpmgm", FPMGMConfig, exist_ok=True)
AutoModel.register(FPMGMConfig, FPMGMForMaskedGeneration, exist_ok=True)
AutoModelForMaskedLM.register(FPMGMConfig, FPMGMForMaskedGeneration, exist_ok=True)
FPMGMConfig.register_for_auto_class()
FPMGMForMaskedGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "FPMGMConfig",
    "FPMGMForMaskedGeneration",
    "FPMGMGenerationConfig",
    "FPMGMGenerationMixin",
    "FPMGMGenerationOutput",
    "FPMGMImagePipeline",
    "FPMGMImagePipelineOutput",
    "FPMGMModel",
    "FPMGMModelOutput",
    "FPMGMOutput",
    "FPMGMPreTrainedModel",
    "FPMGMTextGenerationPipeline",
    "SolverStats",
    "VQVAEConfig",
    "VQVAEModel",
    "VQVAEOutput",
    "WarmStart",
    "anderson",
    "get_solver",
    "picard",
]
