"""PNG writing with A1111-style ``parameters`` text chunks (what web UIs and sharing sites read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, PngImagePlugin

from tuner.formats.io import open_atomic


def infotext(
    *,
    prompt: str,
    negative: str,
    steps: int,
    sampler: str,
    cfg: float,
    seed: int,
    width: int,
    height: int,
    loras: Sequence[tuple[str, float, str]] = (),
    extra: dict[str, str] | None = None,
) -> str:
    """The A1111 ``parameters`` string. ``loras``: (name, scale, short hash) triples; the prompt gets
    ``<lora:name:scale>`` tags and the trailer a ``Lora hashes`` entry, as A1111 writes them."""
    sampler_names = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}
    tags = "".join(f" <lora:{name}:{scale:g}>" for name, scale, _ in loras)
    lines = [prompt + tags]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields = [
        f"Steps: {steps}",
        f"Sampler: {sampler_names.get(sampler, sampler)}",
        f"CFG scale: {cfg:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
    ]
    if loras:
        fields.append('Lora hashes: "' + ", ".join(f"{n}: {h}" for n, _, h in loras) + '"')
    for key, value in (extra or {}).items():
        fields.append(f"{key}: {value}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, *, parameters: str | None = None) -> Path:
    """Save atomically (temporary name, fsync, rename: :func:`~tuner.formats.io.open_atomic`), with a
    ``parameters`` tEXt chunk when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with open_atomic(path) as fh:
        image.save(fh, format="PNG", pnginfo=info)
    return path
