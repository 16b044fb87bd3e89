"""Textual-inversion embeddings: file layouts (read and write), safe pickles, registering vectors in the
text encoder, multi-vector prompt expansion, the trainable placeholder module and ``tuner sample
--embedding``. CPU only, the embedded tiny base (128-wide text encoder), no network."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.adapters.embedding import PlaceholderEmbedding, add_embedding, install_placeholders, token_names
from tuner.cli import main
from tuner.errors import FormatError, TunerError
from tuner.formats.embeddings import (
    SINGLE_KEY,
    build_embedding_metadata,
    bundle_keys,
    file_short_hash,
    read_embedding,
    save_a1111_pt,
    save_diffusers_embedding,
    save_kohya_embedding,
)
from tuner.formats.inspect import format_inspection, inspect_file
from tuner.formats.io import read_safetensors, save_safetensors
from tuner.models.base import load_base
from tuner.models.families import TINY
from tuner.models.prompts import encode_prompts, expand_prompts, tokenize

WIDTH = 128  # the tiny base's text-encoder width


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


@pytest.fixture
def te_tok(tiny):
    """A private (tokenizer, text encoder) pair: tests may add tokens without affecting each other."""
    return copy.deepcopy(tiny.tokenizer), copy.deepcopy(tiny.text_encoder)


def vecs(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- files


def test_token_names():
    assert token_names("<t>", 1) == ["<t>"]
    assert token_names("<t>", 3) == ["<t>", "<t>_1", "<t>_2"]
    with pytest.raises(ValueError):
        token_names("<t>", 0)


def test_kohya_writer_round_trip_with_textual_inversion_metadata(tmp_path):
    v = vecs(3)
    meta = build_embedding_metadata(family=TINY, token="glow", n_vectors=3, tuner_block={"steps": 10})
    path = tmp_path / "glow.safetensors"
    save_kohya_embedding(path, v, meta)
    tensors, stored = read_safetensors(path)
    assert list(tensors) == ["emb_params"]
    assert stored["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert stored["modelspec.trigger_phrase"] == "glow" and "modelspec.sai_model_spec" in stored
    block = json.loads(stored["tuner"])
    assert block["method"] == "textual_inversion" and block["n_vectors"] == 3 and block["steps"] == 10
    emb = read_embedding(path)
    assert (emb.format, emb.token, list(emb.vectors)) == ("kohya", "glow", [SINGLE_KEY])  # token: the stem
    assert torch.equal(emb.vectors[SINGLE_KEY], v) and emb.metadata == stored
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_diffusers_writer_round_trip(tmp_path):
    v = vecs(2)
    path = tmp_path / "learned_embeds.safetensors"
    save_diffusers_embedding(path, "<cat-toy>", v)
    assert read_safetensors(path)[1] == {"format": "pt"}
    emb = read_embedding(path)
    assert (emb.format, emb.token) == ("diffusers", "<cat-toy>")  # token: the key
    assert torch.equal(emb.vectors[SINGLE_KEY], v)
    assert read_embedding(path, token="<other>").token == "<other>"


def test_a1111_writer_round_trip_and_weights_only_load(tmp_path):
    v = vecs(2)
    path = tmp_path / "mystyle.pt"
    save_a1111_pt(path, "mystyle-v2", v, step=500, sd_checkpoint="abc123")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # what ComfyUI does
    assert raw["name"] == "mystyle-v2" and raw["step"] == 500 and raw["string_to_token"] == {"*": 265}
    emb = read_embedding(path)
    assert (emb.format, emb.token) == ("a1111", "mystyle")  # A1111 uses the file stem, not name
    assert emb.metadata == {"name": "mystyle-v2", "step": "500", "sd_checkpoint": "abc123"}
    assert torch.equal(emb.vectors[SINGLE_KEY], v)


def test_bundle_keys_round_trip_and_selection(tmp_path):
    lora = {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)}
    a, b = vecs(2, seed=1), vecs(1, seed=2)
    assert list(bundle_keys("<a>", a)) == ["bundle_emb.<a>.string_to_param.*"]
    one = tmp_path / "one.safetensors"
    save_safetensors(one, {**lora, **bundle_keys("<a>", a)}, {})
    emb = read_embedding(one)
    assert (emb.format, emb.token) == ("bundle", "<a>") and torch.equal(emb.vectors[SINGLE_KEY], a)
    assert read_embedding(one, token="<renamed>").token == "<renamed>"  # a single bundle is renamed

    two = tmp_path / "two.safetensors"
    save_safetensors(two, {**lora, **bundle_keys("<a>", a), **bundle_keys("my.b", b)}, {})
    assert torch.equal(read_embedding(two, token="my.b").vectors[SINGLE_KEY], b)  # names may hold dots
    with pytest.raises(FormatError, match=r"2 embeddings \(<a>, my\.b\).*FILE:NAME"):
        read_embedding(two)


def test_other_layouts_are_read(tmp_path):
    cases = {
        "ot.safetensors": ({"emp_params": vecs(2), "emp_params_out": vecs(2)}, "onetrainer", "ot"),
        "k.safetensors": ({"emb_params": vecs(1).half()}, "kohya", "k"),  # fp16 in, fp32 out
        "flat.safetensors": ({"string_to_param.*": vecs(2)}, "a1111", "flat"),
        "one.safetensors": ({"<z>": vecs(1)[0]}, "diffusers", "<z>"),  # 1-D: unsqueezed
    }
    for name, (tensors, fmt, token) in cases.items():
        save_safetensors(tmp_path / name, tensors, {})
        emb = read_embedding(tmp_path / name)
        assert (emb.format, emb.token) == (fmt, token), name
        v = emb.vectors[SINGLE_KEY]
        assert v.dtype == torch.float32 and v.ndim == 2 and v.shape[1] == WIDTH
    xl = tmp_path / "xl.safetensors"
    save_safetensors(xl, {"clip_l": vecs(2, 768), "clip_g": vecs(2, 1280)}, {})
    emb = read_embedding(xl)
    assert emb.is_sdxl and emb.format == "kohya" and emb.vectors["clip_g"].shape == (2, 1280)
    kohya_pt = tmp_path / "kp.bin"
    torch.save({"emb_params": vecs(2)}, kohya_pt)
    assert read_embedding(kohya_pt).format == "kohya"


def test_unknown_layouts_and_bad_tensors_are_clear_errors(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_safetensors(lora, {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.alpha": torch.ones(())}, {})
    with pytest.raises(FormatError) as err:
        read_embedding(lora)
    message = str(err.value)
    assert str(lora) in message and "'lora_unet_x.alpha'" in message
    assert "emb_params" in message and "string_to_param" in message and "clip_l" in message
    ints = tmp_path / "ints.safetensors"
    save_safetensors(ints, {"emb_params": torch.zeros(2, 4, dtype=torch.int32)}, {})
    with pytest.raises(FormatError, match="floating point"):
        read_embedding(ints)
    with pytest.raises(FormatError, match="does not exist"):
        read_embedding(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this creates ``marker`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path, suffix):
    marker = tmp_path / "code_ran"
    path = tmp_path / f"evil{suffix}"
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}, "name": _Payload(marker)}, path)
    with pytest.raises(TunerError) as err:
        read_embedding(path)
    message = str(err.value)
    assert str(path) in message and ".safetensors" in message
    assert not marker.exists()
    with pytest.raises(TunerError):
        inspect_file(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load does run the payload
    assert marker.exists()


# ---------------------------------------------------------------- model side


def test_add_embedding_writes_rows_and_returns_contiguous_ids(te_tok):
    tok, te = te_tok
    before = len(tok)
    original = te.get_input_embeddings().weight.detach().clone()
    v = vecs(3)
    ids = add_embedding(tok, te, "<glow>", v)
    assert ids == [before, before + 1, before + 2]
    assert tok.convert_tokens_to_ids(["<glow>", "<glow>_1", "<glow>_2"]) == ids
    weight = te.get_input_embeddings().weight
    assert weight.shape == (before + 3, WIDTH)
    assert torch.equal(weight[ids], v) and torch.equal(weight[:before], original)


def test_add_embedding_refuses_wrong_width_duplicates_and_bad_shapes(te_tok):
    tok, te = te_tok
    n_tokens, n_rows = len(tok), te.get_input_embeddings().weight.shape[0]
    with pytest.raises(TunerError) as err:
        add_embedding(tok, te, "<x>", vecs(1, 768), source="x.safetensors")
    message = str(err.value)
    assert "x.safetensors" in message and "768" in message and "128" in message and "SD1" in message
    with pytest.raises(TunerError, match="1024 = SD2"):
        add_embedding(tok, te, "<x>", vecs(1, 1024))
    with pytest.raises(TunerError, match="2-D"):
        add_embedding(tok, te, "<x>", vecs(1)[0])
    with pytest.raises(TunerError, match="already exists"):
        add_embedding(tok, te, "sks", vecs(1))  # a word of the vocabulary
    with pytest.raises(TunerError, match="spaces"):
        add_embedding(tok, te, "my style", vecs(1))
    assert (len(tok), te.get_input_embeddings().weight.shape[0]) == (n_tokens, n_rows)  # nothing changed
    add_embedding(tok, te, "<x>", vecs(2))
    with pytest.raises(TunerError, match="already exists"):
        add_embedding(tok, te, "<x>", vecs(1))
    add_embedding(tok, te, "<y>_1", vecs(1))
    with pytest.raises(TunerError, match="its vector token '<y>_1' already exists"):
        add_embedding(tok, te, "<y>", vecs(2))


def test_multi_vector_prompts_are_expanded(te_tok):
    tok, te = te_tok
    plain = ["a red star on a blue background", "a <m> star"]
    reference = tok(plain, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    assert expand_prompts(tok, plain) == plain
    assert torch.equal(tokenize(tok, plain), reference)  # nothing registered: the tokenizer's own ids
    ids = add_embedding(tok, te, "<m>", vecs(3))
    single = add_embedding(tok, te, "<s>", vecs(1))
    assert expand_prompts(tok, ["a <m> star, <M>.", "x<m> <m>_1 <s>"]) == [
        "a <m> <m>_1 <m>_2 star, <m> <m>_1 <m>_2.",  # CLIP lower-cases, so <M> is <m>
        "x<m> <m>_1 <s>",  # inside a word, an explicit vector name, a single vector: untouched
    ]
    row = tokenize(tok, ["a <m> star <s>"])[0].tolist()
    start = row.index(ids[0])
    assert row[start : start + 5] == [*ids, tok.convert_tokens_to_ids("star</w>"), *single]
    with torch.no_grad():
        with_all = encode_prompts(te, tok, ["a <m> star"])
        first_only = te(tok(["a <m> star"], padding="max_length", max_length=tok.model_max_length,
                             return_tensors="pt").input_ids)[0]
    assert not torch.allclose(with_all, first_only)


def test_placeholder_training_moves_only_the_new_rows(te_tok, tiny):
    tok, te = te_tok
    te.requires_grad_(False)  # the encoder is frozen, but not its token table: install must freeze that
    te.get_input_embeddings().weight.requires_grad_(True)
    table = te.get_input_embeddings().weight.detach().clone()
    star, red, circle = (tok.convert_tokens_to_ids(w + "</w>") for w in ("star", "red", "circle"))
    pe = install_placeholders(tok, te, "<a>", 2, "star")
    assert install_placeholders(tok, te, "<b>", 1, "red circle") is pe  # one module holds both
    assert isinstance(te.get_input_embeddings(), PlaceholderEmbedding) and pe.rows.shape == (3, WIDTH)
    assert torch.equal(pe.vectors("<a>"), table[[star, star]])
    assert torch.allclose(pe.vectors("<b>"), (table[red] + table[circle])[None] / 2)
    ids = torch.tensor([[0, 5, star, len(table) - 1]])
    assert torch.equal(pe(ids), table[ids])  # old ids: the original lookup
    with pytest.raises(TunerError, match="not known"):
        install_placeholders(tok, te, "<c>", 1, "\u00e9")
    with pytest.raises(TunerError, match="already exists"):
        install_placeholders(tok, te, "<a>", 1, "star")

    optimizer = torch.optim.AdamW(list(te.parameters()), lr=0.05, weight_decay=0.5)  # frozen ones included
    rows_before = pe.rows.detach().clone()
    loss = encode_prompts(te, tok, ["a <a> on a <b> background"]).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert torch.equal(pe.original.weight, table)  # every original row, bit for bit
    assert not torch.equal(pe.vectors("<a>"), rows_before[:2]) and not torch.equal(pe.vectors("<b>"), rows_before[2:])
    assert pe.vectors("<a>").shape == (2, WIDTH)

    # what training saves loads back through add_embedding and gives the same prompt embeds
    tok2, te2 = copy.deepcopy(tiny.tokenizer), copy.deepcopy(tiny.text_encoder)
    for token in ("<a>", "<b>"):
        add_embedding(tok2, te2, token, pe.vectors(token))
    with torch.no_grad():
        prompt = ["a <a> on a <b> background"]
        assert torch.allclose(encode_prompts(te, tok, prompt), encode_prompts(te2, tok2, prompt), atol=1e-5)
    with pytest.raises(TunerError, match="placeholders are installed"):
        add_embedding(tok, te, "<late>", vecs(1))


# ---------------------------------------------------------------- CLI


def run_cli(*argv: object) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


def test_sample_with_embedding(tmp_path, tiny):
    emb_path = tmp_path / "glow.safetensors"
    v = vecs(2, seed=3) * tiny.text_encoder.get_input_embeddings().weight.std() * 3
    save_kohya_embedding(emb_path, v, build_embedding_metadata(family=TINY, token="glow", n_vectors=2))
    prompt = "a <glow> star on a blue background"
    common = ["sample", "--base", "tiny", "--prompt", prompt, "--steps", "2", "--seed", "1"]
    rc, text = run_cli(*common, "--embedding", f"{emb_path}:<glow>", "--out", tmp_path / "with")
    assert rc == 0, text
    png = tmp_path / "with" / "sample_1.png"
    assert png.is_file() and f"wrote {png}" in text
    params = Image.open(png).info["parameters"]
    assert f'TI hashes: "<glow>: {file_short_hash(emb_path)}"' in params
    rc, text = run_cli(*common, "--out", tmp_path / "without")
    assert rc == 0, text
    with_emb = np.asarray(Image.open(png), dtype=np.int16)
    without = np.asarray(Image.open(tmp_path / "without" / "sample_1.png"), dtype=np.int16)
    assert np.abs(with_emb - without).max() > 0

    # the token changes the text encoder's output only with the file loaded
    from tuner.sample.generate import EmbeddingSpec, apply_embeddings, read_embeddings

    base = copy.copy(tiny)
    base.tokenizer, base.text_encoder = copy.deepcopy(tiny.tokenizer), copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        before = encode_prompts(base.text_encoder, base.tokenizer, [prompt])
        apply_embeddings(base, read_embeddings([EmbeddingSpec.parse(f"{emb_path}:<glow>")]))
        after = encode_prompts(base.text_encoder, base.tokenizer, [prompt])
        control = encode_prompts(base.text_encoder, base.tokenizer, ["a star on a blue background"])
    assert not torch.allclose(before, after)
    plain = encode_prompts(tiny.text_encoder, tiny.tokenizer, ["a star on a blue background"])
    assert torch.equal(control, plain.detach())  # other prompts are untouched


def test_sample_embedding_errors_come_before_the_base_load(tmp_path, monkeypatch):
    def no_base(*_args, **_kwargs):
        raise AssertionError("the base was loaded before the embedding files were checked")

    monkeypatch.setattr("tuner.models.base.load_base", no_base)
    common = ["sample", "--prompt", "a star", "--steps", "1", "--out", tmp_path / "o"]
    rc, text = run_cli(*common, "--embedding", tmp_path / "missing.safetensors")
    assert rc == 2 and "missing.safetensors" in text and "does not exist" in text
    xl = tmp_path / "xl.safetensors"
    save_safetensors(xl, {"clip_l": vecs(1, 768), "clip_g": vecs(1, 1280)}, {})
    rc, text = run_cli(*common, "--embedding", xl)
    assert rc == 2 and "SDXL" in text and "xl.safetensors" in text
    monkeypatch.undo()
    wide = tmp_path / "wide.safetensors"
    save_kohya_embedding(wide, vecs(1, 768))
    rc, text = run_cli(*common, "--embedding", wide)
    assert rc == 2 and "wide.safetensors" in text and "768" in text and "128" in text
    assert not (tmp_path / "o").exists()


def test_inspect_recognises_embedding_files(tmp_path):
    path = tmp_path / "glow.safetensors"
    save_kohya_embedding(path, vecs(2), build_embedding_metadata(family=TINY, token="glow", n_vectors=2))
    info = inspect_file(path)
    assert info["method"] == "embedding" and info["family"] == "tiny"
    assert info["embedding"] == {"format": "kohya", "token": "glow", "vectors": {SINGLE_KEY: "2 x 128"},
                                 "implies": "tuner's tiny base"}
    assert "token 'glow'" in format_inspection(info)
    pt = tmp_path / "style.pt"
    save_a1111_pt(pt, "style", vecs(3, 768), step=1)
    info = inspect_file(pt)
    assert info["format"] == "embedding-a1111" and info["family"] == "sd15"
    assert info["embedding"]["vectors"] == {SINGLE_KEY: "3 x 768"} and "SD1" in info["embedding"]["implies"]
    assert "token 'style'" in format_inspection(info)
