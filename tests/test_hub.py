"""Model cards are generated and parse; pushes upload our folder (Hub mocked)."""

from unittest import mock

import pytest
import yaml
from conftest import tiny_model

from fpmgm_hf.hub import push_folder, render_model_card


@pytest.mark.parametrize("kind", ["text", "image"])
def test_rendered_card_has_valid_yaml_front_matter(kind):
    model = tiny_model(num_classes=3 if kind == "image" else 0)
    card = render_model_card(
        model,
        kind=kind,
        repo_id="me/tiny",
        revision="abc123",
        base_model="org/base",
        datasets=["shakespeare"],
        settings={"steps": 10},
        results="| budget | ppl |\n|---|---|",
    )
    text = str(card)
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "transformers"
    assert {"custom_code", "masked-diffusion", "fixed-point"} <= set(front["tags"])
    assert front["base_model"] == "org/base" and front["license"] == "apache-2.0" and "pipeline_tag" in front
    assert "trust_remote_code=True" in text and 'revision="abc123"' in text and "| steps | 10 |" in text


def test_unknown_card_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        render_model_card(tiny_model(), kind="audio")


def test_push_uploads_the_folder_with_our_card(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    render_model_card(model, repo_id="me/tiny").save(tmp_path / "README.md")
    api = mock.MagicMock()
    push_folder(tmp_path, "me/tiny", private=True, revision="v1", api=api)
    api.create_repo.assert_called_once_with(repo_id="me/tiny", private=True, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/tiny" and kwargs["revision"] == "v1" and kwargs["folder_path"] == str(tmp_path)
    uploaded = sorted(p.name for p in (tmp_path).iterdir())
    assert {"README.md", "config.json", "model.safetensors", "modeling_fpmgm.py", "generation_config.json"} <= set(
        uploaded
    )
    assert "fixed-point" in (tmp_path / "README.md").read_text()


def test_push_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        push_folder(tmp_path, "me/x", api=mock.MagicMock())
