"""The model card (README.md in Hugging Face Hub conventions) written beside every exported adapter."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import small_recipe

from tuner.train.card import CARD_MARKER, CardFacts, render_card, write_card

QUIET = {"log": lambda *_: None}


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def facts(tmp_path: Path, **changes) -> CardFacts:
    base = {
        "name": "subject", "method": "lora", "family": "sd15",
        "family_description": "Stable Diffusion 1.x", "base": "./sd15", "trigger_words": ["sks dog"],
        "instance_prompt": "", "license": "", "settings": {"rank / alpha": "8 / 8"},
        "files": [tmp_path / "subject.safetensors", tmp_path / "subject.toml"],
    }
    return CardFacts(**{**base, **changes})


def test_a_trained_lora_gets_a_hub_card(circles, tmp_path):
    from tuner.train.loop import train
    from tuner.train.setup import setup_run

    recipe = small_recipe(circles, tmp_path, train__steps=2, preview__every=2, preview__steps=2,
                          preview__prompts=["a white circle"], output__trigger_words=["zz circle"])
    result = train(setup_run(recipe, **QUIET), **QUIET)
    card = tmp_path / "README.md"
    assert card in result.outputs and card.is_file()
    meta, body = front_matter(card.read_text(encoding="utf-8"))
    assert "base_model" not in meta  # the tiny base is not on the Hub; the comment says so
    assert meta["license"] == "apache-2.0"
    assert {"lora", "text-to-image", "tuner", "stable-diffusion"} <= set(meta["tags"])
    assert meta["instance_prompt"] == "zz circle"
    [widget] = meta["widget"]
    assert widget["output"]["url"] == "previews/step_000002.png" and (tmp_path / widget["output"]["url"]).is_file()
    assert "a white circle" in widget["text"]
    assert "- `zz circle`" in body and "family `tiny`" in body
    assert "`t.safetensors`" in body and "<lora:t:1>" in body
    assert "| rank / alpha | 8 / 8 |" in body and "| steps | 2 |" in body
    assert "![" in body and "tuner train t.toml" in body
    assert CARD_MARKER in body
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_card_for_a_hub_family_names_the_reference_base_and_licence(tmp_path):
    meta, body = front_matter(render_card(facts(tmp_path), tmp_path))
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["instance_prompt"] == "sks dog"
    assert "base `./sd15`" in body and "<lora:subject:1>" in body

    meta, body = front_matter(render_card(facts(tmp_path, license="mit", family="sdxl"), tmp_path))
    assert meta["license"] == "mit" and meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "stable-diffusion-xl" in meta["tags"] and "output.license" in body


def test_embedding_card_and_quoting(tmp_path):
    files = [tmp_path / "embeddings" / "pink.safetensors", tmp_path / "embeddings" / "pink.diffusers.safetensors"]
    text = render_card(facts(tmp_path, method="textual_inversion", trigger_words=['<pink> "x": y'], files=files),
                       tmp_path)
    meta, body = front_matter(text)
    assert meta["instance_prompt"] == '<pink> "x": y'  # YAML-safe quoting
    assert "textual_inversion" in meta["tags"] and "lora" not in meta["tags"]
    assert "`embeddings/pink.safetensors`" in body and "tuner sample --embedding embeddings/pink.safetensors" in body


def test_a_readme_the_user_wrote_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("# my notes\n", encoding="utf-8")
    path = write_card(facts(tmp_path), tmp_path)
    assert path.name == "subject.README.md"
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "# my notes\n"
    (tmp_path / "README.md").unlink()
    assert write_card(facts(tmp_path), tmp_path).name == "README.md"
    assert write_card(facts(tmp_path, trigger_words=["new"]), tmp_path).name == "README.md"  # ours: rewritten
    assert "`new`" in (tmp_path / "README.md").read_text(encoding="utf-8")
