"""fpmgm_hf: Fixed-Point Masked Generative Models (FP-MDLM, FP-MaskGIT, CoFRe) for Hugging Face.

Importing the package registers `FPMGMConfig` / `FPMGMForMaskedGeneration` (and the VQ tokenizer's
`VQVAEConfig` / `VQVAEModel`) with the Auto classes, so
`AutoModel.from_pretrained(path)` works without `trust_remote_code` when fpmgm_hf is installed; saved
folders also carry the model files for `trust_remote_code=True` loading without it.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_fpmgm import FPMGMConfig
from .configuration_vqvae import VQVAEConfig
from .generation_fpmgm import FPMGMGenerationConfig, FPMGMGenerationMixin, FPMGMGenerationOutput
from .modeling_fpmgm import (
    FPMGMForMaskedGeneration,
    FPMGMModel,
    FPMGMModelOutput,
    FPMGMOutput,
    FPMGMPreTrainedModel,
    WarmStart,
)
from .modeling_vqvae import VQVAEModel, VQVAEOutput
from .pipeline_fpmgm import FPMGMImagePipeline, FPMGMImagePipelineOutput, FPMGMTextGenerationPipeline
from .solver_fpmgm import SolverStats, anderson, get_solver, picard

__version__ = "0.1.0"

AutoConfig.register("fpmgm", FPMGMConfig, exist_ok=True)
AutoModel.register(FPMGMConfig, FPMGMForMaskedGeneration, exist_ok=True)
AutoModelForMaskedLM.register(FPMGMConfig, FPMGMForMaskedGeneration, exist_ok=True)
FPMGMConfig.register_for_auto_class()
FPMGMForMaskedGeneration.register_for_auto_class("AutoModel")
AutoConfig.register("fpmgm_vqvae", VQVAEConfig, exist_ok=True)
AutoModel.register(VQVAEConfig, VQVAEModel, exist_ok=True)
VQVAEConfig.register_for_auto_class()
VQVAEModel.register_for_auto_class("AutoModel")


def __getattr__(name: str):
    # The conversion entry point, imported on first use: `import fpmgm_hf` stays free of the tooling subpackages.
    if name == "load_mdlm_checkpoint":
        from .conversion.mdlm_import import load_mdlm_checkpoint

        return load_mdlm_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "load_mdlm_checkpoint",
    "picard",
]
