"""Pipelines shipped with the model folder: text generation and class-to-image, through remote code in a clean
process (fpmgm_hf blocked, Hub offline), and the same classes used locally."""

import json

import pytest
import torch
from conftest import MASK, tiny_model
from remote_helpers import run_isolated
from test_evaluation import tiny_tokenizer
from test_images import NUM_CLASSES, K
from test_images import tiny_model as tiny_image_model

from fpmgm_hf import VQVAEConfig, VQVAEModel
from fpmgm_hf.images.train import set_image_generation_defaults
from fpmgm_hf.pipeline_fpmgm import FPMGMImagePipeline, FPMGMTextGenerationPipeline


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text") / "model"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image") / "model"
    model = tiny_image_model()
    set_image_generation_defaults(model)
    model.save_pretrained(folder)
    torch.manual_seed(0)
    VQVAEModel(VQVAEConfig(codebook_size=K, hidden_channels=8, code_dim=4)).save_pretrained(folder / "vq")
    return folder


def test_saved_folders_declare_and_ship_their_pipeline(text_folder, image_folder):
    text = json.loads((text_folder / "config.json").read_text())["custom_pipelines"]
    image = json.loads((image_folder / "config.json").read_text())["custom_pipelines"]
    assert text == {"text-generation": {"impl": "pipeline_fpmgm.FPMGMTextGenerationPipeline",
                                        "pt": ["AutoModelForMaskedLM"], "type": "text"}}
    assert list(image) == ["image-generation"] and image["image-generation"]["impl"].endswith("FPMGMImagePipeline")
    for name in ("pipeline_fpmgm.py", "modeling_vqvae.py", "configuration_vqvae.py", "canvas_fpmgm.py",
                 "generation_config_fpmgm.py", "streaming_fpmgm.py"):
        assert (text_folder / name).is_file() and (image_folder / name).is_file(), name


def test_text_generation_pipeline_through_remote_code(text_folder, tmp_path):
    result = run_isolated(
        f"""
        import json, torch
        from transformers import pipeline
        folder = {str(text_folder)!r}
        try:
            pipeline("text-generation", model=folder)
            refused = False
        except ValueError as err:
            refused = "trust_remote_code" in str(err)
        pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
        seeded = lambda: torch.Generator().manual_seed(0)
        cont = pipe("w1 w2", max_new_tokens=4, steps=3, generator=seeded())
        new_only = pipe("w1 w2", max_new_tokens=4, steps=3, generator=seeded(), return_full_text=False)
        inferred = pipeline(model=folder, trust_remote_code=True)  # the folder names its only task
        infill = inferred("w1 [MASK] [MASK] w3", num_return_sequences=2, steps=2, generator=seeded(),
                          skip_special_tokens=False)  # w0 is a special token of the tiny tokenizer
        default = pipe("w1", generator=seeded(), return_tensors=True)
        print()  # ends the line of transformers' "run the custom code?" prompt
        print(json.dumps({{"refused": refused, "module": type(pipe).__module__, "task": inferred.task,
                          "cont": cont, "new_only": new_only, "infill": infill, "default": default}}))
        """,
        tmp_path,
    )
    assert result["refused"] and result["module"].startswith("transformers_modules")
    assert result["task"] == "text-generation"
    tok, model = tiny_tokenizer(), tiny_model()
    seq = model.generate(torch.tensor([[1, 2]]), max_new_tokens=4, num_steps=3,
                         generator=torch.Generator().manual_seed(0))
    assert result["cont"] == [{"generated_text": tok.decode(seq[0], skip_special_tokens=True)}]
    assert result["new_only"] == [{"generated_text": tok.decode(seq[0, 2:], skip_special_tokens=True)}]
    infill = [r["generated_text"].split() for r in result["infill"]]
    assert len(infill) == 2 and all(len(words) == 4 and words[0] == "w1" and words[3] == "w3" for words in infill)
    default_ids = result["default"][0]["generated_token_ids"]
    assert len(default_ids) == 1 + FPMGMTextGenerationPipeline.DEFAULT_MAX_NEW_TOKENS and MASK not in default_ids


def test_image_pipeline_through_remote_code(image_folder, tmp_path):
    result = run_isolated(
        f"""
        import json, torch
        from transformers import pipeline
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        folder = {str(image_folder)!r}
        pipe = pipeline("image-generation", model=folder, trust_remote_code=True)
        out = pipe(class_labels=[0, 3], budget=12, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        cls = get_class_from_dynamic_module("pipeline_fpmgm.FPMGMImagePipeline", folder)
        again = cls.from_pretrained(folder)([0, 3], budget=12, guidance_scale=2.0,
                                            generator=torch.Generator().manual_seed(0), output_type="pt")
        print(json.dumps({{"module": type(pipe).__module__, "vq": type(pipe.vqvae).__module__,
                          "images": [[im.mode, list(im.size), list(im.getdata())] for im in out.images],
                          "ids": out.token_ids.tolist(), "passes": out.block_passes.tolist(),
                          "again": again.token_ids.tolist(), "pt": list(again.images.shape)}}))
        """,
        tmp_path,
    )
    assert result["module"].startswith("transformers_modules") and result["vq"].startswith("transformers_modules")
    model = tiny_image_model()
    set_image_generation_defaults(model)
    ids = model.generate(batch_size=2, class_labels=torch.tensor([0, 3]), budget=12, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))
    assert result["ids"] == ids.tolist() == result["again"] and all(p <= 12 for p in result["passes"])
    vq = VQVAEModel.from_pretrained(image_folder, subfolder="vq").eval()
    pixels = (vq.decode(ids)[:, 0] * 255).round().to(torch.uint8)
    assert [im[:2] for im in result["images"]] == [["L", [28, 28]]] * 2
    assert [im[2] for im in result["images"]] == pixels.reshape(2, -1).tolist()
    assert result["pt"] == [2, 1, 28, 28]


def test_image_pipeline_locally_in_the_diffusers_style(image_folder):
    pipe = FPMGMImagePipeline.from_pretrained(image_folder)
    out = pipe(list(range(NUM_CLASSES)), budget=12, num_return_sequences=2, output_type="np")
    assert out.images.shape == (2 * NUM_CLASSES, 28, 28, 1) and out.images.dtype.name == "uint8"
    assert out.token_ids.shape == (2 * NUM_CLASSES, 49) and not (out.token_ids == K).any()
    images, = pipe(1, budget=12, return_dict=False)
    assert len(images) == 1 and images[0].size == (28, 28)
    for kwargs, name in ((dict(class_labels=[1.5]), "class_labels"), (dict(class_labels=None), "class_labels"),
                         (dict(class_labels=[1], output_type="gif"), "output_type"),
                         (dict(class_labels=[NUM_CLASSES + 1]), "class_labels"),
                         (dict(class_labels=[1], budget=10**9), "budget")):
        with pytest.raises(ValueError, match=name):
            pipe(**kwargs)


def test_text_pipeline_locally(text_folder):
    pipe = FPMGMTextGenerationPipeline(model=tiny_model(), tokenizer=tiny_tokenizer(), device=-1)
    out = pipe("w1 w2", max_new_tokens=3, num_steps=2, return_tensors=True)
    assert len(out[0]["generated_token_ids"]) == 5 and MASK not in out[0]["generated_token_ids"]
    with pytest.raises(ValueError, match="string prompt"):
        pipe(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe("w1", max_new_tokens=-1)
