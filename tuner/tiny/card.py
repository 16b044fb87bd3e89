"""Installing pretrained tiny weights into the package and writing their model card."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tuner.formats.io import write_text_atomic

CARD_NAME = "MODEL_CARD.md"


def install_weights(final_dir: str | Path, assets_dir: str | Path) -> Path:
    """Replace ``assets_dir`` with the diffusers folder ``final_dir`` (atomic rename of a full copy)."""
    final_dir, assets_dir = Path(final_dir), Path(assets_dir)
    if not (final_dir / "model_index.json").exists():
        raise FileNotFoundError(f"'{final_dir}' is not a finished pretraining output (no model_index.json)")
    tmp = Path(tempfile.mkdtemp(prefix=".assets.", dir=assets_dir.parent))
    try:
        shutil.copytree(final_dir, tmp, dirs_exist_ok=True)
        old = assets_dir.with_name(assets_dir.name + ".old")
        if assets_dir.exists():
            os.replace(assets_dir, old)
        os.replace(tmp, assets_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return assets_dir


def _table(report: dict[str, Any]) -> str:
    acc = report["accuracy"]
    return " | ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items())


def write_card(
    assets_dir: str | Path,
    *,
    settings: dict[str, Any],
    history: dict[str, list[float]],
    minutes: float,
    command: str,
    evals: dict[str, dict[str, Any]],
    notes: list[str] | None = None,
) -> Path:
    """``MODEL_CARD.md`` beside the weights: data, steps, losses, wall time, quality figures, command."""
    losses = history.get("loss", [])
    tail = sum(losses[-200:]) / max(1, len(losses[-200:]))
    sizes = {p.parent.name: p.stat().st_size for p in Path(assets_dir).glob("*/*.safetensors")}
    lines = [
        "# tuner tiny base",
        "",
        "A tiny SD1-style latent diffusion model (diffusers classes: AutoencoderKL with "
        f"{settings.get('latent_factor', 4)}x downsampling, a",
        "4-layer 128-wide CLIP text encoder with a word-level tokenizer, a UNet2DConditionModel with",
        "cross-attention) trained " + ("" if (init := settings.get("init_from")) else "from scratch ")
        + "by tuner on the toy world of WORLD.md. It is the embedded",
        "`tiny` base: the main job runs on it with no download."
        + (f" Its text encoder and UNet started from the tiny base `{init}` (every UNet tensor with a same-shaped"
           " counterpart; that base was itself trained from scratch by tuner on the same world), its VAE from"
           " random weights." if init else ""),
        "",
        "## Data",
        "Every distinct scene of the world's pretraining split (one object on a solid background, 64 px;",
        "held-out (shape, colour) pairs excluded), captions re-drawn each time with the size and position",
        "phrases each dropped with p = 0.3"
        + (f", the colour word with p = {cd:g}" if (cd := settings.get("color_drop")) else "")
        + f" and the whole caption with p = {settings.get('caption_dropout')}.",
        "",
        "## Training",
        f"- command: `{command}`",
        f"- settings: `{json.dumps(settings, sort_keys=True)}`",
        "- objective: the VAE on reconstruction (MSE + 0.5 L1"
        + (f", object pixels weighted {1 + vfg:g}x" if (vfg := settings.get("vae_fg_weight")) else "")
        + ") and a small KL term"
        + (f", {100 * aug:g}% of its images world geometry in free colours with nested shapes"
           if (aug := settings.get("vae_augment")) else "")
        + "; then the text encoder and",
        "  UNet on v-prediction over a zero-terminal-SNR scaled-linear schedule"
        + (f" with every SNR divided by {shift:g}" if (shift := settings.get("snr_shift", 1.0)) != 1.0 else "")
        + " (the noisiest step holds no",
        "  signal, so the layout must come from the prompt), "
        + (f"MSE with latent pixels under the object weighted {1 + fg:g}x" if (fg := settings.get("fg_weight"))
           else "plain MSE")
        + "; an EMA of the weights"
        f" (decay {settings.get('ema_decay')}) ships",
        f"- UNet + text encoder steps: {len(losses)}; mean loss of the last 200 steps: {tail:.4f}",
        f"- wall time: {minutes:.0f} min on 2 CPU cores"
        + (" (this run; the starting base's own training not counted)" if init else ""),
        f"- weights shipped (bytes): {json.dumps(sizes, sort_keys=True)}",
        "",
        "## Quality (tuner eval: DDIM 25 steps, CFG 5, EMA weights, judged from pixels)",
    ]
    for name, report in evals.items():
        lines.append(f"- {name} (n = {report['n']}): {_table(report)}")
    for note in notes or []:
        lines += ["", note]
    path = Path(assets_dir) / CARD_NAME
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def evaluate_and_install(
    final_dir: str | Path,
    *,
    settings: dict[str, Any],
    minutes: float,
    command: str,
    assets_dir: str | Path | None = None,
    n_seen: int = 200,
    n_heldout: int = 64,
    log=print,
) -> dict[str, dict[str, Any]]:
    """Judge the pretrained base (seen and held-out prompts), write its model card into ``final_dir``
    and, with ``assets_dir``, install it there as the embedded ``tiny`` base. Returns the eval reports."""
    from tuner.models.base import load_base
    from tuner.tiny.evaluate import eval_base

    final_dir = Path(final_dir)
    base = load_base(str(final_dir))
    evals = {
        "seen prompts": eval_base(base, split="seen", n=n_seen, progress=True).to_dict(),
        "held-out pairs": eval_base(base, split="heldout", n=n_heldout, progress=True).to_dict(),
    }
    for name, report in evals.items():
        log(f"{name}: {_table(report)}")
    history_file = final_dir.parent / "history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    write_card(final_dir, settings=settings, history=history, minutes=minutes, command=command, evals=evals)
    if assets_dir is not None:
        install_weights(final_dir, assets_dir)
        log(f"installed as the embedded tiny base: {assets_dir}")
    return evals
