"""The model card: ``README.md`` beside every exported adapter, in Hugging Face Hub conventions.

The YAML front matter carries what the Hub indexes (``base_model``, ``license``, ``tags``,
``instance_prompt``, ``widget`` with sample images); the body says what the adapter is, its trigger words,
how to load it in A1111/ComfyUI and diffusers, the key training settings, the sample images and the exact
command that remakes it (``tuner train <name>.toml``: the resolved recipe written beside the weights).

A ``README.md`` already in the output folder that tuner did not write is never overwritten: the card then
goes to ``<name>.README.md`` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuner.formats.io import write_text_atomic

CARD_MARKER = "<!-- model card written by tuner; it is rewritten after every export -->"

# Family -> (reference model on the Hub, licence of that base). A local base of a family is usually a
# fine-tune of the reference, so the card names it as the Hub's ``base_model`` and says what was used.
FAMILY_HUB: dict[str, tuple[str | None, str]] = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
    "sd2": ("stabilityai/stable-diffusion-2-base", "openrail++"),
    "sd2v": ("stabilityai/stable-diffusion-2", "openrail++"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "openrail++"),
    "tiny": (None, "apache-2.0"),  # tuner's embedded base: not on the Hub, licensed with tuner
}


@dataclass
class CardFacts:
    """Everything the card says, as plain values (so the card can be written without a run)."""

    name: str
    method: str
    family: str
    family_description: str
    base: str
    trigger_words: list[str]
    instance_prompt: str
    license: str
    settings: dict[str, str]
    files: list[Path]
    samples: list[tuple[str, Path]] = field(default_factory=list)
    """(prompt, image path) pairs."""
    recipe_path: str | None = None


def render_card(facts: CardFacts, folder: Path) -> str:
    """The card's text; paths are written relative to ``folder`` (where the card lives)."""
    hub_base, family_license = FAMILY_HUB.get(facts.family, (None, "other"))
    license_id = facts.license or family_license
    kind = {"lora": "LoRA", "dreambooth": "DreamBooth", "textual_inversion": "textual-inversion embedding",
            "pivotal": "pivotal-tuning (LoRA + embedding)"}.get(facts.method, facts.method)
    tags = ["text-to-image", "diffusers", "tuner",
            *(["lora", "template:sd-lora"] if facts.method in ("lora", "pivotal", "dreambooth") else []),
            *(["textual_inversion"] if facts.method in ("textual_inversion", "pivotal") else []),
            *(["dreambooth"] if facts.method == "dreambooth" else []),
            {"sdxl": "stable-diffusion-xl"}.get(facts.family, "stable-diffusion")]
    prompt = ", ".join(facts.trigger_words) or facts.instance_prompt

    def rel(path: Path) -> str:
        try:
            return path.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            return path.as_posix()

    front = ["---"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    else:
        front.append(f"# base_model: none on the Hub ({facts.family_description})")
    front += [f"license: {license_id}", "tags:"] + [f"- {tag}" for tag in tags]
    if prompt:
        front.append(f"instance_prompt: {json.dumps(prompt, ensure_ascii=False)}")
    if facts.samples:
        front.append("widget:")
        for text, image in facts.samples:
            front += [f"- text: {json.dumps(text, ensure_ascii=False)}", "  output:",
                      f"    url: {json.dumps(rel(image))}"]
    front.append("---")

    body = [CARD_MARKER, "", f"# {facts.name}", "",
            f"A {kind} for {facts.family_description} (family `{facts.family}`), trained with "
            f"[tuner](https://pypi.org/project/tuner-diffusion/) on the base `{facts.base}`."]
    if facts.license:
        body += ["", f"Licence: `{facts.license}` (set by the recipe's `output.license`)."]
    elif hub_base:
        body += ["", f"Licence: `{license_id}`, the licence of the {facts.family} base it was trained on."]
    body += ["", "## Trigger words", ""]
    body += ([f"- `{word}`" for word in facts.trigger_words] if facts.trigger_words else
             [f"None set; the captions used `{facts.instance_prompt}`." if facts.instance_prompt
              else "None: the adapter was trained on the dataset's own captions."])
    body += ["", "## Files", ""] + [f"- `{rel(path)}`" for path in facts.files]
    body += ["", "## Use", ""]
    weights = next((rel(p) for p in facts.files if p.suffix == ".safetensors" and p.parent == folder), None)
    if facts.method in ("lora", "pivotal", "dreambooth") and weights:
        body += [f"- AUTOMATIC1111 / ComfyUI / kohya: put `{weights}` in `models/Lora` and add "
                 f"`<lora:{Path(weights).stem}:1>` to the prompt.",
                 f"- diffusers: `pipe.load_lora_weights(FOLDER, weight_name=\"{weights}\")`, FOLDER being this "
                 "folder or its Hub repository id.",
                 f"- tuner: `tuner sample --base {facts.base} --lora {weights} --prompt \"{prompt or 'a photo'}\"`."]
    embeddings = [rel(p) for p in facts.files if p.parent.name == "embeddings" and
                  not p.name.endswith(".diffusers.safetensors")]
    if embeddings:
        body += [f"- embeddings: put `{e}` in A1111's `embeddings/` folder (the file name is the prompt word), "
                 f"or `tuner sample --embedding {e}`." for e in embeddings]
    if facts.method == "dreambooth":
        body += ["- the fine-tuned model: `model/` is a diffusers folder (`StableDiffusionPipeline."
                 "from_pretrained(\"model\")`, or `--base model` in tuner)."]
    body += ["", "## Training", "", "| setting | value |", "|---|---|"]
    body += [f"| {key} | {value} |" for key, value in facts.settings.items()]
    if facts.samples:
        body += ["", "## Samples", ""]
        body += [f"![{text}]({rel(image)})" for text, image in facts.samples]
    body += ["", "## Reproduce", "", "```sh", f"tuner train {facts.name}.toml"
             + ("" if not facts.recipe_path else f"    # made from {facts.recipe_path}"), "```", "",
             f"`{facts.name}.toml` is the resolved recipe (every setting, defaults included).", ""]
    return "\n".join(front + body)


def write_card(facts: CardFacts, folder: Path) -> Path:
    """Write the card as ``folder/README.md`` (atomically), or ``<name>.README.md`` when a README.md that
    tuner did not write is already there. Returns the path written."""
    path = folder / "README.md"
    if path.exists() and CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        path = folder / f"{facts.name}.README.md"
    write_text_atomic(path, render_card(facts, folder))
    return path
