"""UNet module paths: diffusers tree <-> original LDM (CompVis/sgm) tree, as data (FORMATS.md §1.5).

kohya names SD1/SD2 UNet modules after the diffusers tree and SDXL modules after the LDM tree; A1111 and
ComfyUI accept both. The mapping is a table of block-prefix pairs generated from a :class:`UnetLayout`
(how many levels, resnets per level, which levels have attention), plus the renames inside resnets.
Attention internals (``proj_in``, ``transformer_blocks.K.attn1.to_q``, ``ff.net.2``) are the same in both.

Paths here are dotted module paths without a component prefix (``down_blocks.0.attentions.0.proj_in``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class UnetLayout:
    """The block structure the LDM numbering depends on.

    ``levels``: number of down (and up) blocks. ``layers_per_block``: resnets per down block (up blocks
    have one more). ``down_attention_levels`` / ``up_attention_levels``: indices of the down/up blocks
    that have attention (``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D``). ``mid_attention``: whether
    the mid block has attention between its two resnets.
    """

    levels: int
    layers_per_block: int
    down_attention_levels: tuple[int, ...]
    up_attention_levels: tuple[int, ...]
    mid_attention: bool = True


SD1_LAYOUT = UnetLayout(
    levels=4, layers_per_block=2, down_attention_levels=(0, 1, 2), up_attention_levels=(1, 2, 3)
)
SDXL_LAYOUT = UnetLayout(
    levels=3, layers_per_block=2, down_attention_levels=(1, 2), up_attention_levels=(0, 1)
)

# Family name -> layout, for the families whose kohya files may use LDM names. SD2 has SD1's block
# structure. tuner's tiny base has no entry: no other tool writes LDM names for it.
LDM_LAYOUTS: dict[str, UnetLayout] = {
    "sd15": SD1_LAYOUT, "sd2": SD1_LAYOUT, "sd2v": SD1_LAYOUT, "sdxl": SDXL_LAYOUT,
}

# Inside a resnet block (both architectures).
RESNET_RENAMES: tuple[tuple[str, str], ...] = (
    ("conv1", "in_layers.2"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
    ("norm1", "in_layers.0"),
    ("norm2", "out_layers.0"),
)

# Modules outside the numbered blocks.
EXTRA_RENAMES: tuple[tuple[str, str], ...] = (
    ("conv_in", "input_blocks.0.0"),
    ("conv_out", "out.2"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
)


@dataclass(frozen=True)
class BlockPair:
    """One block (or single module) in both trees; ``resnet`` says whether RESNET_RENAMES apply inside."""

    diffusers: str
    ldm: str
    resnet: bool = False


@cache
def block_pairs(layout: UnetLayout) -> tuple[BlockPair, ...]:
    """Every numbered block of ``layout`` as a (diffusers prefix, LDM prefix) pair, per FORMATS.md §1.5.

    With ``n = layers_per_block + 1``: down block ``i`` resnet/attention ``j`` is ``input_blocks.{1+n*i+j}``
    slot 0/1 and its downsampler ``input_blocks.{n*(i+1)}.0.op``; up block ``i`` resnet/attention ``j``
    (``j < n``) is ``output_blocks.{n*i+j}`` slot 0/1 and its upsampler sits in ``output_blocks.{n*i+n-1}``
    at slot 2 when the level has attention, else slot 1.
    """
    n = layout.layers_per_block + 1
    pairs: list[BlockPair] = []
    for i in range(layout.levels):
        for j in range(layout.layers_per_block):
            pairs.append(BlockPair(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + n * i + j}.0", True))
            if i in layout.down_attention_levels:
                pairs.append(BlockPair(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{1 + n * i + j}.1"))
        if i < layout.levels - 1:
            pairs.append(
                BlockPair(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n * (i + 1)}.0.op")
            )
    pairs.append(BlockPair("mid_block.resnets.0", "middle_block.0", True))
    if layout.mid_attention:
        pairs.append(BlockPair("mid_block.attentions.0", "middle_block.1"))
    pairs.append(BlockPair("mid_block.resnets.1", f"middle_block.{2 if layout.mid_attention else 1}", True))
    for i in range(layout.levels):
        has_attention = i in layout.up_attention_levels
        for j in range(n):
            pairs.append(BlockPair(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n * i + j}.0", True))
            if has_attention:
                pairs.append(BlockPair(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n * i + j}.1"))
        if i < layout.levels - 1:
            slot = 2 if has_attention else 1
            pairs.append(
                BlockPair(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n * i + n - 1}.{slot}.conv")
            )
    pairs.extend(BlockPair(d, ldm) for d, ldm in EXTRA_RENAMES)
    return tuple(pairs)


def to_ldm_path(layout: UnetLayout, path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``input_blocks.1.1.proj_in`` (SD1); ``ValueError`` if unmapped."""
    return _convert(layout, path, to_ldm=True)


def to_diffusers_path(layout: UnetLayout, path: str) -> str:
    """``input_blocks.11.0.out_layers.3`` -> ``down_blocks.3.resnets.1.conv2`` (SD1); ``ValueError`` if unmapped."""
    return _convert(layout, path, to_ldm=False)


def _convert(layout: UnetLayout, path: str, *, to_ldm: bool) -> str:
    for pair in block_pairs(layout):
        src, dst = (pair.diffusers, pair.ldm) if to_ldm else (pair.ldm, pair.diffusers)
        rest = _strip_prefix(path, src)
        if rest is None:
            continue
        if rest and pair.resnet:
            rest = _rename_head(rest, RESNET_RENAMES if to_ldm else tuple((b, a) for a, b in RESNET_RENAMES))
        return f"{dst}.{rest}" if rest else dst
    side = "diffusers" if to_ldm else "LDM"
    raise ValueError(f"no {'LDM' if to_ldm else 'diffusers'} name for {side} UNet path {path!r} in {layout}")


def _strip_prefix(path: str, prefix: str) -> str | None:
    """The part of ``path`` after ``prefix`` (``""`` for an exact match), or None if it does not start with it."""
    if path == prefix:
        return ""
    if path.startswith(prefix + "."):
        return path[len(prefix) + 1 :]
    return None


def _rename_head(rest: str, renames: tuple[tuple[str, str], ...]) -> str:
    for src, dst in renames:
        tail = _strip_prefix(rest, src)
        if tail is not None:
            return f"{dst}.{tail}" if tail else dst
    return rest
