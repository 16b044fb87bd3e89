"""Textual-inversion embeddings on the model side: new tokens in the tokenizer, their vectors in the text
encoder, and the trainable placeholder module used to learn them.

Conventions (diffusers'): an embedding of ``n`` vectors for trigger ``T`` registers the tokens
``T, T_1, ..., T_{n-1}`` (:func:`token_names`) with contiguous new ids; a prompt that says ``T`` is
expanded to all ``n`` of them by :func:`tuner.models.prompts.tokenize`. Vectors are ``[n, D]`` with ``D``
the text encoder's hidden size. Only the generic accessors (``get_input_embeddings`` /
``set_input_embeddings`` / ``resize_token_embeddings``) are used, so this works with transformers 5's
``CLIPTextModel`` (which has no ``.text_model`` level) as well as older layouts.

Two ways in:

* :func:`add_embedding` (sampling, or starting from a file): the vectors become ordinary rows of a resized
  ``nn.Embedding``.
* :func:`install_placeholders` (training): the token-embedding module is replaced by a
  :class:`PlaceholderEmbedding` whose only trainable tensor is ``rows``; every original row stays
  bit-identical because it is never in the optimizer's reach.

A family with two text encoders (SDXL) registers the same token in both, each with vectors of its own width
(``clip_l`` / ``clip_g`` in files): :func:`add_embedding_to_base` for sampling; for training one placeholder
module per encoder, trained as components ``embedding`` and ``embedding_2`` (:func:`placeholder_component`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tuner.errors import TunerError


def token_names(token: str, n: int) -> list[str]:
    """``[token, token_1, ..., token_{n-1}]``: the tokens a multi-vector embedding registers."""
    if n < 1:
        raise ValueError(f"an embedding has at least one vector, got n={n}")
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_embedding(
    tokenizer: Any, text_encoder: Any, token: str, vectors: torch.Tensor, *, source: str | None = None
) -> list[int]:
    """Register ``token`` (and ``token_1 ...`` for several vectors) and write ``vectors`` ``[n, D]`` into
    the new rows of the text encoder's resized input embeddings. Returns the new ids, in order.

    Nothing is changed unless every check passes (:func:`check_embedding`).
    """
    check_embedding(tokenizer, text_encoder, token, vectors, source=source)
    ids = _add_tokens(tokenizer, token_names(token, int(vectors.shape[0])))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = vectors.detach().to(device=weight.device, dtype=weight.dtype)
    return ids


def check_embedding(
    tokenizer: Any, text_encoder: Any, token: str, vectors: torch.Tensor, *, source: str | None = None
) -> None:
    """What :func:`add_embedding` checks before changing anything; each failure is a :class:`TunerError`
    (``source``, e.g. the file name, is named in it): ``vectors`` not 2-D; ``D`` not the encoder's hidden
    size (both widths and the family each implies are named); ``token`` empty or containing whitespace;
    ``token`` or one of its names already a token of the vocabulary; placeholders already installed (add
    files first)."""
    where = f"{source}: " if source else ""
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2:
        shape = list(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise TunerError(f"{where}embedding vectors must be a 2-D [n_vectors, width] tensor, got {shape}")
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, PlaceholderEmbedding):
        raise TunerError(
            f"{where}cannot add embedding '{token}': textual-inversion placeholders are installed in this "
            "text encoder; add embedding files before installing placeholders"
        )
    _check_width(embedding.embedding_dim, int(vectors.shape[1]), token, where)
    _check_new_tokens(tokenizer, token_names(token, int(vectors.shape[0])), where)


def check_embedding_family(family: Any, vectors: Mapping[str, torch.Tensor], *, source: str | None = None) -> None:
    """:class:`TunerError` unless ``vectors`` has exactly the keys of ``family``'s embedding files
    (``family.embedding_keys``): an SDXL file on a one-encoder base or the reverse, named in words."""
    if set(vectors) == set(family.embedding_keys):
        return
    where = f"{source}: " if source else ""
    kind = ("an SDXL embedding (clip_l + clip_g vectors)" if {"clip_l", "clip_g"} <= set(vectors)
            else "a one-text-encoder embedding (SD1.x/SD2.x style)" if len(vectors) == 1
            else f"an embedding with vectors {', '.join(sorted(vectors))}")
    want = " + ".join(family.embedding_keys)
    raise TunerError(
        f"{where}this is {kind}, but the base is {family.description}, whose embeddings hold {want} vectors. "
        "Use an embedding trained for this family."
    )


def add_embedding_to_base(base: Any, token: str, vectors: Mapping[str, torch.Tensor], *, source: str | None = None) -> None:
    """Register ``token`` in every text encoder of ``base`` (a :class:`~tuner.models.base.BaseModel`) with
    the vectors its family's ``embedding_key`` names (``{"text_encoder": [n, D]}``; SDXL:
    ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, as the file holds them). Every encoder is checked before
    any is changed, so a failure leaves the base as it was: :class:`TunerError` when the keys are not the
    family's (an SDXL file on a one-encoder base or the reverse, naming both) or any
    :func:`check_embedding` check fails."""
    family = base.family
    check_embedding_family(family, vectors, source=source)
    pairs = [(getattr(base, spec.tokenizer), getattr(base, spec.component), vectors[spec.embedding_key])
             for spec in family.text_encoders]
    for tokenizer, encoder, rows in pairs:
        check_embedding(tokenizer, encoder, token, rows, source=source)
    for tokenizer, encoder, rows in pairs:
        add_embedding(tokenizer, encoder, token, rows, source=source)


def _check_width(expected: int, width: int, token: str, where: str) -> None:
    if width == expected:
        return
    from tuner.formats.embeddings import describe_width

    raise TunerError(
        f"{where}embedding '{token}' has width {width} but this text encoder's hidden size is {expected}: "
        f"the file is for another model family ({width} = {describe_width(width)}; this base: "
        f"{expected} = {describe_width(expected)}). Use an embedding trained for this base."
    )


def _existing_id(tokenizer: Any, name: str) -> int | None:
    """The id ``name`` already stands for: an exact vocabulary entry, or a word the tokenizer reads as one
    known token (CLIP's ``sks`` -> ``sks</w>``; with a lower-casing tokenizer also other casings)."""
    vocab = tokenizer.get_vocab()
    if name in vocab:
        return int(vocab[name])
    ids = tokenizer(name, add_special_tokens=False).input_ids
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    return None


def _check_new_tokens(tokenizer: Any, names: list[str], where: str) -> None:
    token = names[0]
    if not token or any(c.isspace() for c in token):
        raise TunerError(
            f"{where}embedding token {token!r} must be one word without spaces; pass another, e.g. FILE:<my-token>"
        )
    for name in names:
        existing = _existing_id(tokenizer, name)
        if existing is not None:
            what = "the token" if name == token else f"its vector token {name!r}"
            raise TunerError(
                f"{where}cannot register embedding '{token}': {what} already exists in the tokenizer's "
                f"vocabulary (id {existing}), so the embedding would shadow it or clash with one loaded "
                "before. Choose another trigger (e.g. <my-token>; for a file: FILE:<my-token>)."
            )


def _add_tokens(tokenizer: Any, names: list[str]) -> list[int]:
    """Add ``names`` as new tokens and return their ids, which must be new and contiguous."""
    first = len(tokenizer)
    added = tokenizer.add_tokens(names)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(names)]
    if added != len(names) or ids != list(range(first, first + len(names))):
        raise RuntimeError(f"tokenizer assigned ids {ids} to {names}; expected new contiguous ids from {first}")
    return ids


class PlaceholderEmbedding(nn.Module):
    """A text encoder's token embedding with trainable rows for new tokens (textual-inversion training).

    ``original``: the encoder's ``nn.Embedding``, frozen (``requires_grad=False``). ``rows``: the only
    trainable tensor, an fp32 ``nn.Parameter`` ``[K, D]`` for the ids ``first_new_id .. first_new_id+K-1``.
    ``forward(input_ids)`` equals the lookup in ``original`` with the new ids' rows taken from ``rows``
    (cast to the original's dtype). Gradients reach only ``rows``, so every original row stays bit-identical
    whatever the optimizer (weight decay included) does with the parameters it is given.

    One module holds every placeholder token: calling :func:`install_placeholders` again appends rows and
    replaces ``rows`` with a longer Parameter, so install all tokens before building the optimizer.
    ``tokens`` maps each trigger to ``(offset in rows, n_vectors)``.
    """

    def __init__(self, original: nn.Embedding, first_new_id: int, rows: torch.Tensor, token: str):
        super().__init__()
        self.original = original
        original.weight.requires_grad_(False)
        self.first_new_id = int(first_new_id)
        self.rows = nn.Parameter(rows.detach().to(original.weight.device, torch.float32).clone())
        self.tokens: dict[str, tuple[int, int]] = {token: (0, int(rows.shape[0]))}

    @property
    def embedding_dim(self) -> int:
        return int(self.original.embedding_dim)

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + int(self.rows.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        """The full ``[num_embeddings, D]`` table (original rows then ``rows``); read-only, for lookups."""
        base = self.original.weight[: self.first_new_id]
        return torch.cat([base, self.rows.to(base.dtype)])

    def append(self, token: str, rows: torch.Tensor) -> None:
        """Add ``rows`` ``[n, D]`` for the next ``n`` ids as ``token``'s vectors (replaces ``self.rows``)."""
        if token in self.tokens:
            raise TunerError(f"placeholder '{token}' is already installed")
        start = int(self.rows.shape[0])
        grown = torch.cat([self.rows.detach(), rows.detach().to(self.rows.device, torch.float32)])
        self.rows = nn.Parameter(grown)
        self.tokens[token] = (start, int(rows.shape[0]))

    def vectors(self, token: str) -> torch.Tensor:
        """A detached fp32 copy ``[n, D]`` of ``token``'s current vectors (what an embedding file stores)."""
        if token not in self.tokens:
            known = ", ".join(self.tokens) or "none"
            raise TunerError(f"no placeholder '{token}' is installed (installed: {known})")
        start, n = self.tokens[token]
        return self.rows.detach()[start : start + n].to("cpu", torch.float32).clone()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = input_ids >= self.first_new_id
        out = self.original(input_ids.masked_fill(new, 0))
        if not bool(new.any()):
            return out
        extra = nn.functional.embedding((input_ids - self.first_new_id).clamp(min=0), self.rows)
        return torch.where(new.unsqueeze(-1), extra.to(out.dtype), out)


def placeholder_component(text_encoder_component: str) -> str:
    """The trained-component name of the placeholder rows in a text encoder: ``text_encoder`` ->
    ``embedding``, ``text_encoder_2`` -> ``embedding_2`` (checkpoints and the optimizer's groups use it)."""
    return text_encoder_component.replace("text_encoder", "embedding", 1)


def install_placeholders(
    tokenizer: Any, text_encoder: Any, token: str, n_vectors: int, init_word: str
) -> PlaceholderEmbedding:
    """Add ``token`` (``n_vectors`` names, :func:`token_names`) to ``tokenizer`` and make the text encoder's
    token embedding a :class:`PlaceholderEmbedding` whose rows for them are trainable. Returns the module.

    Every vector starts as the embedding of ``init_word`` (the mean of its tokens' rows if it tokenizes to
    several). Call once per placeholder token, all before building the optimizer (each call after the
    first extends the same module). :class:`TunerError` when ``init_word`` is empty or contains a token
    the tokenizer does not know, ``n_vectors < 1``, or ``token`` clashes with the vocabulary (as in
    :func:`add_embedding`).
    """
    if n_vectors < 1:
        raise TunerError(f"placeholder '{token}': n_vectors must be at least 1, got {n_vectors}")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids if init_word.strip() else []
    if not init_ids or tokenizer.unk_token_id in init_ids:
        raise TunerError(
            f"placeholder '{token}': init word {init_word!r} is "
            f"{'empty' if not init_ids else 'not known to the tokenizer (it maps to the unknown token)'}; "
            "pass a word the base understands that describes the concept, e.g. 'star' or 'pink'"
        )
    current = text_encoder.get_input_embeddings()
    names = token_names(token, n_vectors)
    _check_new_tokens(tokenizer, names, "")
    with torch.no_grad():
        init = current.weight[init_ids].float().mean(dim=0)
    rows = init.expand(n_vectors, -1).clone()
    ids = _add_tokens(tokenizer, names)
    if isinstance(current, PlaceholderEmbedding):
        if ids[0] != current.num_embeddings:
            raise TunerError(
                f"placeholder '{token}': its ids start at {ids[0]} but the installed placeholders end at "
                f"{current.num_embeddings}; something else added tokens in between"
            )
        current.append(token, rows)
        return current
    if ids[0] > current.num_embeddings:
        raise TunerError(
            f"placeholder '{token}': the tokenizer has {ids[0]} tokens before it but the text encoder's "
            f"embedding only {current.num_embeddings} rows; they do not belong together"
        )
    module = PlaceholderEmbedding(current, ids[0], rows, token)
    text_encoder.set_input_embeddings(module)
    return module
