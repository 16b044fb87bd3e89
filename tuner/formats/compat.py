"""Which tools are expected to load an adapter file fully: the rules of FORMATS.md §1.6, §3.3, §4-6.

:func:`expected_loaders` judges from the key layout alone (names, shapes, alphas); it runs no other tool.
Each answer is ``yes``, ``partial`` (it loads, but some modules or the scale are lost) or ``no``, with
the reason. The rules are those the reference verified by running diffusers and ComfyUI, and read from
A1111's and kohya's code; an answer marked "(unverified)" rests on reading only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

TOOLS = ("diffusers", "ComfyUI", "A1111", "kohya")
_LDM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
_NO_TEXT_MODEL = re.compile(r"^lora_te\d?_encoder_layers_")
_PEFT_ATTENTION = re.compile(r"(^|\.)(unet\.)?.*attn[12]\.(to_q|to_k|to_v|to_out)")


def _answer(loads: str, why: str = "") -> dict[str, str]:
    return {"loads": loads, "why": why}


def expected_loaders(
    fmt: str,
    family: str | None,
    keys: Sequence[str],
    rank_alpha: Mapping[str, Mapping[str, Any]] | None = None,
    embedding_format: str | None = None,
) -> dict[str, dict[str, str]]:
    """``{tool: {"loads": yes|partial|no, "why": reason}}`` for a file of format ``fmt``.

    ``rank_alpha``: module -> {"rank", "alpha", "conv3"} (whether it is a kxk conv), to judge alpha
    handling; ``embedding_format``: the layout :func:`~tuner.formats.embeddings.read_embedding` found.
    """
    if fmt.startswith("embedding"):
        return _embedding(embedding_format or fmt.removeprefix("embedding-"))
    result = {tool: _answer("yes") for tool in TOOLS}
    names = sorted({k.split(".", 1)[0] for k in keys if not k.startswith("bundle_emb.")})
    if fmt in ("peft", "diffusers-old", "diffusers-attn-processor"):
        attention = any(_PEFT_ATTENTION.search(k) for k in keys)
        result["ComfyUI"] = (
            _answer("partial", "ComfyUI's key map has no PEFT/diffusers names for attention to_q/k/v/out: "
                    "those modules are dropped ('lora key not loaded'; FORMATS.md §1.6)")
            if attention else _answer("yes")
        )
        result["A1111"] = _answer("no", "A1111 splits keys at the first '.', so 'unet.'/'text_encoder.' names "
                                  "match no module; convert with `tuner convert --to kohya`")
        result["kohya"] = _answer("no", "kohya reads only lora_unet_/lora_te_ names; `tuner convert --to kohya`")
        if fmt == "diffusers-attn-processor":
            result["diffusers"] = _answer("yes", "old attention-processor naming, converted on load")
        return result
    if fmt in ("lycoris-loha", "lycoris-lokr"):
        kind = "LoHa" if fmt == "lycoris-loha" else "LoKr"
        result["diffusers"] = _answer("no", f"diffusers' kohya converter raises on {kind} (hada_*/lokr_*) keys")
        result["kohya"] = _answer("no", "sd-scripts' networks/lora.py reads LoRA only; kohya loads LyCORIS "
                                  "through the LyCORIS network module (lycoris.kohya) when installed")
        result["A1111"] = _answer("yes", f"the built-in Lora extension reads {kind}")
    elif fmt == "dora":
        if all(k.startswith("lora_") for k in keys):
            result["diffusers"] = _answer("no", "diffusers drops dora_scale with a warning and applies a plain "
                                          "LoRA: different weights (FORMATS.md §3.2)")
            result["kohya"] = _answer("no", "sd-scripts' networks/lora.py has no DoRA; needs the LyCORIS module")
            result["A1111"] = _answer("yes", "recent A1111 (1.9+) applies dora_scale (unverified)")
        else:  # PEFT-named DoRA
            result["ComfyUI"] = _answer("partial", "PEFT-named attention modules are dropped (FORMATS.md §1.6)")
            result["A1111"] = _answer("no", "PEFT names match no A1111 module")
            result["kohya"] = _answer("no", "PEFT names; kohya reads lora_unet_/lora_te_ names only")
        return result
    if fmt == "kohya-bundle":
        result["diffusers"] = _answer("no", "diffusers refuses files with bundle_emb.* keys ('Invalid LoRA "
                                      "checkpoint'); use the plain LoRA file")
        result["ComfyUI"] = _answer("partial", "the LoRA loads (one warning per bundle_emb key); the embedding "
                                    "only works from the embeddings folder")
        result["kohya"] = _answer("partial", "the LoRA loads; bundled embeddings are ignored")

    sdxl = family == "sdxl" or any(n.startswith("lora_te2_") for n in names)
    ldm_unet = [n for n in names if _LDM_UNET.match(n)]
    if ldm_unet and not sdxl:
        result["diffusers"] = _answer("no", f"{len(ldm_unet)} UNet modules use LDM names, which diffusers maps "
                                      "only for SDXL; `tuner convert --to kohya` renames them")
        result["kohya"] = _answer("no", "kohya's SD1/SD2 UNet uses diffusers names; `tuner convert --to kohya`")
    te1_single = [n for n in names if n.startswith("lora_te1_")] if not sdxl else []
    if te1_single and result["kohya"]["loads"] == "yes":
        result["kohya"] = _answer("partial", "kohya SD1/SD2 expects lora_te_: the text-encoder modules "
                                  "(lora_te1_) are not loaded")
    flat_te = [n for n in names if _NO_TEXT_MODEL.match(n)]
    if flat_te:
        why = f"{len(flat_te)} text-encoder names lack 'text_model' (kohya under transformers 5)"
        result["ComfyUI"] = _answer("partial", why + ": dropped")
        result["A1111"] = _answer("partial", why + ": not matched")
        if result["kohya"]["loads"] == "yes":
            result["kohya"] = _answer("partial", why)
    if sdxl and result["A1111"]["loads"] == "yes":
        if any(n.startswith("lora_unet_up_blocks_0_upsamplers_0_conv") for n in names):
            result["A1111"] = _answer("partial", "SDXL with diffusers names: A1111 sends up_blocks_0's upsampler "
                                      "conv to a missing module (dropped)")
    if rank_alpha and result["diffusers"]["loads"] == "yes":
        linear = {row["alpha"] for row in rank_alpha.values() if not row.get("conv3")}
        if len(linear) > 1:
            result["diffusers"] = _answer(
                "partial", "alpha varies between Linear/1x1 modules: diffusers uses the most common alpha for "
                "some of them (wrong scale; FORMATS.md §3.3). `tuner convert --to peft` bakes exact scales"
            )
    if family == "tiny":
        for tool in TOOLS:
            note = "tuner's tiny base exists only in tuner; judged by key layout"
            result[tool]["why"] = f"{result[tool]['why']}; {note}" if result[tool]["why"] else note
    return result


def _embedding(layout: str) -> dict[str, dict[str, str]]:
    result = {tool: _answer("yes") for tool in TOOLS}
    result["A1111"] = _answer("yes", "the prompt word is the file name")
    result["ComfyUI"] = _answer("yes", "used as embedding:<file name>")
    if layout in ("kohya", "embedding-kohya", "embedding-sdxl"):
        result["diffusers"] = _answer("yes", "pass token= (the key 'emb_params' is not a word); SDXL: load "
                                      "clip_l and clip_g separately")
    elif layout in ("diffusers", "embedding-diffusers"):
        result["kohya"] = _answer("no", "kohya expects emb_params (or clip_l/clip_g); `tuner convert --to kohya`")
    elif layout == "onetrainer":
        result["kohya"] = _answer("no", "kohya expects emb_params; `tuner convert --to kohya`")
        result["diffusers"] = _answer("yes", "pass token=")
    elif layout == "bundle":
        result = {
            "diffusers": _answer("no", "refuses bundle files"),
            "ComfyUI": _answer("partial", "only from the embeddings folder, all bundled embeddings concatenated"),
            "A1111": _answer("yes", "registered while the LoRA is active"),
            "kohya": _answer("no", "ignores bundle_emb keys"),
        }
    return result


def format_loaders(loaders: Mapping[str, Mapping[str, str]]) -> list[str]:
    """One line per tool: ``  diffusers: yes`` or ``  ComfyUI:   partial (why)``."""
    lines = []
    for tool, answer in loaders.items():
        why = f" ({answer['why']})" if answer.get("why") else ""
        lines.append(f"    {tool + ':':<10} {answer['loads']}{why}")
    return lines
