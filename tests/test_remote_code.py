"""The Hub path for real: load through AutoModel with trust_remote_code in a process without fpmgm_hf."""

import json

import torch
from conftest import VOCAB, tiny_model
from remote_helpers import run_isolated


def test_remote_code_round_trip_gives_identical_logits_and_generation_config(tmp_path):
    model = tiny_model(num_classes=2)
    model.generation_config.sampler = "confidence"
    model.generation_config.top_k = 50  # equal to GenerationConfig's default: must still round-trip
    save = tmp_path / "saved"
    model.save_pretrained(save)
    config = json.loads((save / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_fpmgm.FPMGMConfig",
        "AutoModel": "modeling_fpmgm.FPMGMForMaskedGeneration",
        "AutoModelForMaskedLM": "modeling_fpmgm.FPMGMForMaskedGeneration",
    }
    x = torch.randint(0, VOCAB, (2, 9))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x, class_labels=torch.tensor([0, 1])).logits
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModel, AutoModelForMaskedLM
        m = AutoModel.from_pretrained({str(save)!r}, trust_remote_code=True).eval()
        m2 = AutoModelForMaskedLM.from_pretrained({str(save)!r}, trust_remote_code=True)
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            logits = m(x, class_labels=torch.tensor([0, 1])).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        seq = m.generate(batch_size=2, seq_len=6, num_steps=3, class_labels=torch.tensor([0, 1]),
                         guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        long = m.diffusion_generate(torch.tensor([[1, 2]]), max_new_tokens=70, block_length=16, steps=2, alg="entropy",
                                    eos_token_id=5, class_labels=torch.tensor([1]),
                                    generator=torch.Generator().manual_seed(0))
        print(json.dumps({{"module": type(m).__module__, "cls2": type(m2).__name__, "long": long.tolist(),
                          "gen": [type(m.generation_config).__name__, m.generation_config.sampler,
                                  m.generation_config.top_k], "seq": seq.tolist()}}))
        """,
        tmp_path,
    )
    assert result["module"].startswith("transformers_modules"), result["module"]
    assert result["cls2"] == "FPMGMForMaskedGeneration"
    assert result["gen"] == ["FPMGMGenerationConfig", "confidence", 50]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    seq = model.generate(
        batch_size=2,
        seq_len=6,
        num_steps=3,
        class_labels=torch.tensor([0, 1]),
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert seq.tolist() == result["seq"]
    long = model.diffusion_generate(torch.tensor([[1, 2]]), max_new_tokens=70, block_length=16, steps=2, alg="entropy",
                                    eos_token_id=5, class_labels=torch.tensor([1]),
                                    generator=torch.Generator().manual_seed(0))
    assert long.shape == (1, 72) and long.tolist() == result["long"]  # blockwise past the 64-token context
