"""Load a recipe: file, then ``--set`` overrides, then CLI shortcuts; typed and validated once (STYLE.md #4).

Every problem is collected and raised together as one :class:`~tuner.errors.RecipeError`. Each message
names where the value came from (the file, ``--set`` or ``command line``), the dotted key, the value and
what was expected. Nothing is converted behind the user's back except an int written for a float field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from tuner.config.schema import Recipe
from tuner.errors import RecipeError, TunerError

RECIPE_SUFFIXES = (".toml", ".yaml", ".yml")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (),
                shortcuts: Mapping[str, object] | None = None) -> Recipe:
    """Build a validated :class:`Recipe`; later sources win: defaults < file < ``overrides`` < ``shortcuts``.

    ``path``: a ``.toml``, ``.yaml`` or ``.yml`` file, or None for all defaults. ``overrides``: ``--set``
    strings ``dotted.key=value``, the value read as TOML (``10``, ``true``, ``[0.9, 0.99]``, ``"text"``),
    else as plain text; a text field always takes the text as written (``output.name=123``).
    ``shortcuts``: dotted key -> already-typed value from CLI options; None values are skipped.

    Raises :class:`TunerError` for a missing or unreadable file, an unsupported extension or a syntax error
    (naming the line), and one :class:`RecipeError` listing every type, key and :func:`check_recipe` problem.
    """
    recipe = Recipe()
    problems: list[str] = []
    origins: dict[str, str] = {}  # dotted key -> the source that set it last, to label semantic problems
    if path is not None:
        _apply(recipe, _read_file(Path(path)), str(path), "", problems, origins)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not all(key.split(".")):
            problems.append(f"--set {item!r}: expected dotted.key=value, e.g. train.steps=10")
            continue
        _apply(recipe, _nest(key, _parse_override(key, raw.strip())), "--set", "", problems, origins)
    for key, value in (shortcuts or {}).items():
        if value is not None:
            _apply(recipe, _nest(key, value), "command line", "", problems, origins)
    for key, message in _semantic_problems(recipe):
        problems.append(f"{origins[key]}: {message}" if key in origins else message)
    if problems:
        raise RecipeError(problems)
    return recipe


def check_recipe(recipe: Recipe) -> list[str]:
    """Cross-field and range rules for a type-correct recipe; returns one message per broken rule."""
    return [message for _, message in _semantic_problems(recipe)]


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain nested dicts (table -> key -> value); lists are copies."""
    return dataclasses.asdict(recipe)


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as a TOML document that :func:`load_recipe` reads back to an equal recipe."""
    lines: list[str] = []
    for table, values in recipe_to_dict(recipe).items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def recipe_hash(recipe: Recipe) -> str:
    """First 16 hex digits of the sha256 of the recipe's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(recipe_to_dict(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in RECIPE_SUFFIXES:
        accepted = ", ".join(RECIPE_SUFFIXES)
        raise TunerError(f"{path}: unsupported recipe file type {suffix!r}; use one of {accepted}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TunerError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TunerError(f"cannot read recipe file {path}: {exc}") from None
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # the message ends with "(at line N, column M)"
            raise TunerError(f"{path}: invalid TOML: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TunerError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is not None and not isinstance(data, dict):
        raise TunerError(f"{path}: expected a mapping of tables at the top, got {type(data).__name__}")
    return data or {}


def _parse_override(key: str, raw: str) -> Any:
    """A ``--set`` value as TOML, else as plain text; a text field always gets text."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    # "1\nx = 2" would smuggle in a second key; a text field takes "123" or "true" as written
    if set(parsed) != {"v"} or (_is_text(_type_at(key)) and not isinstance(parsed["v"], str)):
        return raw
    return parsed["v"]


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    return functools.reduce(lambda inner, part: {part: inner}, reversed(dotted.split(".")), value)


@functools.cache
def _all_keys() -> tuple[str, ...]:
    """Every dotted leaf key of the schema (``train.steps``); a recipe is tables of values, two levels."""
    tables = get_type_hints(Recipe)
    return tuple(f"{table}.{key}" for table, tp in tables.items() for key in get_type_hints(tp))


def _type_at(dotted: str) -> Any:
    tp: Any = Recipe
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = get_type_hints(tp).get(part)
    return tp


def _is_text(tp: Any) -> bool:
    return tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)))


def _apply(obj: Any, data: Mapping[Any, Any], source: str, prefix: str, problems: list[str],
           origins: dict[str, str]) -> None:
    """Set the fields of dataclass ``obj`` from ``data`` (types via get_type_hints: the schema's annotations
    are strings), appending a message per bad key or value."""
    hints = get_type_hints(type(obj))
    for raw_key, value in data.items():
        key = str(raw_key)
        dotted = prefix + key
        tp = hints.get(key) if isinstance(raw_key, str) else None
        if tp is None:
            suggestion = _suggest(key, prefix, list(hints))
            problems.append(f"{source}: unknown key {dotted} = {_show(value)}; {suggestion}")
        elif dataclasses.is_dataclass(tp):
            if isinstance(value, Mapping):
                _apply(getattr(obj, key), value, source, dotted + ".", problems, origins)
            else:
                keys = ", ".join(get_type_hints(tp))
                problems.append(f"{source}: {dotted} = {_show(value)}: expected a table with keys {keys}")
        else:
            checked, expected = _check(value, tp)
            if expected is None:
                setattr(obj, key, checked)
                origins[dotted] = source
            else:
                problems.append(f"{source}: {dotted} = {_show(value)}: expected {expected}")


def _check(value: Any, tp: Any) -> tuple[Any, str | None]:
    """``(value, None)`` with ints turned into floats for float fields, or ``(value, what was expected)``."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and abs(value) <= sys.float_info.max)  # False for nan, inf and ints too big for a float
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif get_origin(tp) is Literal:
        ok = isinstance(value, str) and value in get_args(tp)
    elif get_origin(tp) is list:
        items = [_check(v, get_args(tp)[0]) for v in value] if isinstance(value, (list, tuple)) else []
        ok = isinstance(value, (list, tuple)) and all(err is None for _, err in items)
        value = [v for v, _ in items] if ok else value
    else:
        raise TypeError(f"recipe schema uses an unsupported type {tp!r}")  # a bug in schema.py, not input
    return value, None if ok else _describe(tp) + _hint(value, tp)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    return {bool: "bool (true or false)", int: "int", float: "float (a finite number)", str: "str"}[tp]


def _hint(value: Any, tp: Any) -> str:
    """Explain the two YAML surprises users hit: ``no``/``on`` are booleans, ``1e-4`` is text."""
    if isinstance(value, bool) and _is_text(tp):
        return " (put it in quotes: YAML reads no/yes/on/off as booleans)"
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return " (write it as a number, not text; YAML needs a dot: 1.0e-4, not 1e-4)"
    return ""


def _suggest(key: str, prefix: str, valid: list[str]) -> str:
    """A did-you-mean: the same name in another table first, then a close spelling at this level."""
    elsewhere = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == key]
    close = [prefix + k for k in difflib.get_close_matches(key, valid, n=3)]
    guesses = elsewhere or close
    if guesses:
        return "did you mean " + " or ".join(guesses) + "?"
    return f"expected one of {', '.join(prefix + k for k in valid)}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# (dotted key, rule, what is expected). Types are already checked when these run.
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("adapter.rank", lambda v: v >= 1, ">= 1"),
    ("adapter.alpha", lambda v: v > 0, "> 0 (alpha 0 would mean scale 0 in other tools)"),
    ("adapter.conv_rank", lambda v: v >= 1, ">= 1"),
    ("adapter.conv_alpha", lambda v: v > 0, "> 0 (alpha 0 would mean scale 0 in other tools)"),
    ("adapter.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adapter.text_encoder_rank", lambda v: v >= 0, ">= 0 (0 = same as rank)"),
    ("adapter.text_encoder_alpha", lambda v: v >= 0, ">= 0 (0 = same as alpha)"),
    ("data.repeats", lambda v: v >= 1, ">= 1"),
    ("data.resolution", lambda v: v == 0 or (v >= 8 and v % 8 == 0), "0 (native) or a multiple of 8, >= 8"),
    ("data.caption_dropout", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.bucket_step", lambda v: v == 0 or (v >= 8 and v % 8 == 0), "0 (the family's) or a multiple of 8, >= 8"),
    ("data.min_bucket_reso", lambda v: v == 0 or v >= 8, "0 (resolution / 2) or a size in px, >= 8"),
    ("data.max_bucket_reso", lambda v: v == 0 or v >= 8, "0 (resolution x 2) or a size in px, >= 8"),
    ("data.keep_tags", lambda v: v >= 0, ">= 0"),
    ("data.alpha_background", lambda v: len(v) == 3 and all(0 <= c <= 255 for c in v),
     "3 integers in 0..255 (an RGB colour, e.g. [255, 255, 255] for white)"),
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.gradient_accumulation", lambda v: v >= 1, ">= 1"),
    ("train.min_snr_gamma", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.noise_offset", lambda v: v >= 0, ">= 0"),
    ("train.max_grad_norm", lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    ("train.max_bad_steps", lambda v: v >= 1, ">= 1"),
    ("train.checkpoint_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("train.keep_checkpoints", lambda v: v >= 0, ">= 0"),
    ("optim.learning_rate", lambda v: v > 0, "> 0"),
    ("optim.text_encoder_lr", lambda v: v >= 0, ">= 0 (0 = same as learning_rate)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "2 numbers in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "> 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("preview.every", lambda v: v >= 0, ">= 0 (0 = no previews)"),
    ("preview.steps", lambda v: v >= 1, ">= 1"),
    ("embedding.vectors", lambda v: 1 <= v <= 75, "between 1 and 75"),
    ("embedding.learning_rate", lambda v: v > 0, "> 0"),
    ("prior.num_images", lambda v: v >= 1, ">= 1"),
    ("prior.batch_size", lambda v: v >= 1, ">= 1"),
    ("prior.loss_weight", lambda v: v >= 0, ">= 0"),
    ("prior.steps", lambda v: v >= 1, ">= 1"),
    ("train.ema_decay", lambda v: 0 <= v < 1, "0 (off) or a decay in (0, 1), e.g. 0.999"),
    ("output.name", lambda v: v != "" and not set(v) & set("/\\"), "a non-empty file stem without / or \\"),
]


def _semantic_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """(dotted key to blame, message) for every broken rule."""
    out: list[tuple[str, str]] = []
    for key, rule, expected in _RULES:
        value = functools.reduce(getattr, key.split("."), recipe)
        if not rule(value):
            out.append((key, f"{key} = {_show(value)}: expected {expected}"))
    if not recipe.data.center_crop and recipe.train.cache_latents:
        out.append(("data.center_crop", "data.center_crop = False with train.cache_latents = True: random "
                    "crops need train.cache_latents = false, because cached latents fix the crop"))
    out += _bucket_problems(recipe)
    out += _memory_problems(recipe)
    if recipe.adapter.method in ("textual_inversion", "pivotal"):
        e = recipe.embedding
        if not e.tokens:
            out.append(("embedding.tokens", f"embedding.tokens = []: adapter.method = {recipe.adapter.method!r} "
                        "needs at least one new token, e.g. tokens = [\"<pink>\"]"))
        if len(e.init_words) != len(e.tokens):
            out.append(("embedding.init_words", f"embedding.init_words = {_show(e.init_words)}: expected one word "
                        f"per token ({len(e.tokens)}), e.g. init_words = [\"pink\"]"))
        if len(set(e.tokens)) != len(e.tokens):
            out.append(("embedding.tokens", f"embedding.tokens = {_show(e.tokens)}: tokens must be distinct"))
    p = recipe.prior
    if p.enabled and not p.class_prompts and not p.class_dir:
        out.append(("prior.class_prompts", "prior.class_prompts = []: prior preservation needs class prompts to "
                    "generate class images (or prior.class_dir with captioned class images)"))
    if p.enabled and recipe.adapter.method == "textual_inversion":
        out.append(("prior.enabled", "prior.enabled = true with adapter.method = 'textual_inversion': prior "
                    "preservation protects weights, and textual inversion changes none; use 'pivotal' or 'lora'"))
    if recipe.preview.every > 0 and not recipe.preview.prompts:
        out.append(("preview.every", "preview.prompts = []: expected at least one prompt when "
                    f"preview.every = {recipe.preview.every} (or set preview.every = 0)"))
    return out


def _bucket_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Bucket keys that would do nothing, and combinations not supported; sizes are checked in setup."""
    d, out = recipe.data, []
    if not d.bucketing:
        for key in ("bucket_step", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale"):
            if getattr(d, key):
                out.append((f"data.{key}", f"data.{key} = {_show(getattr(d, key))} has no effect without "
                            "data.bucketing = true: turn bucketing on, or remove the key"))
        return out
    if d.min_bucket_reso and d.max_bucket_reso and d.min_bucket_reso > d.max_bucket_reso:
        out.append(("data.min_bucket_reso", f"data.min_bucket_reso = {d.min_bucket_reso} is above "
                    f"data.max_bucket_reso = {d.max_bucket_reso}"))
    return out


def _memory_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Memory settings that cannot work together."""
    t, out = recipe.train, []
    if recipe.optim.fused_backward:
        why = "optim.fused_backward = true steps each tensor inside backward"
        if t.gradient_accumulation > 1:
            out.append(("optim.fused_backward", f"{why}, so it cannot accumulate gradients over micro-batches "
                        f"(train.gradient_accumulation = {t.gradient_accumulation}): set it to 1 and raise "
                        "train.batch_size, or turn fused_backward off"))
        if t.max_grad_norm > 0:
            out.append(("optim.fused_backward", f"{why}, before the global gradient norm is known, so it cannot "
                        f"clip by it (train.max_grad_norm = {t.max_grad_norm:g}): set train.max_grad_norm = 0, "
                        "or turn fused_backward off"))
        if t.mixed_precision == "fp16":
            out.append(("optim.fused_backward", f"{why}, but fp16's gradient scaler must unscale every gradient "
                        'before any step: use train.mixed_precision = "bf16" (or "no"), or turn fused_backward off'))
    if recipe.optim.shard_gradients and t.mixed_precision == "fp16":
        out.append(("optim.shard_gradients", "optim.shard_gradients = true leaves each process only its share "
                    "of the gradients, but fp16's gradient scaler checks every gradient for overflow on every "
                    'process: use train.mixed_precision = "bf16" (or "no"), or turn shard_gradients off'))
    if t.shard_frozen and recipe.adapter.method == "dreambooth":
        out.append(("train.shard_frozen", "train.shard_frozen = true splits the frozen UNet weights, but a "
                    "DreamBooth fine-tune trains them all: use optim.shard_gradients = true (ZeRO-2) to split its "
                    "gradients and optimizer states instead"))
    if recipe.optim.shard_gradients and recipe.optim.fused_backward:
        out.append(("optim.shard_gradients", "optim.shard_gradients and optim.fused_backward both change what "
                    "happens to gradients inside backward: fused_backward is single-process only, so turn it "
                    "off for data-parallel training"))
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form; "1e-08", "inf" and "nan" are valid TOML
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
