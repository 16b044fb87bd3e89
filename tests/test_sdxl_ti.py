"""SDXL textual inversion and pivotal tuning on the small SDXL topology (tuner.models.small): one token in both
text encoders (clip_l = text_encoder, clip_g = text_encoder_2), only its new rows train, the
``{"clip_l", "clip_g"}`` file (kohya/A1111/ComfyUI) re-imports into both encoders, ``tuner sample
--embedding`` uses it, and diffusers' StableDiffusionXLPipeline with the same vectors draws the same image."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_recipe, write_circles

from tuner.adapters.embedding import PlaceholderEmbedding
from tuner.cli import main
from tuner.errors import TunerError
from tuner.formats.embeddings import read_embedding, save_kohya_embedding
from tuner.formats.io import read_header, read_safetensors
from tuner.models.base import export_base
from tuner.models.prompts import encode_conditioning
from tuner.models.small import small_base
from tuner.sample.generate import EmbeddingSpec, LoraSpec, apply_embeddings, load_loras_for, read_embeddings
from tuner.sample.sampler import SampleSettings, sample_images
from tuner.train.loop import train
from tuner.train.setup import setup_run

PROMPT = "a <zz> circle on a blue background"
SETTINGS = SampleSettings(steps=4, cfg=5.0, sampler="ddim", width=64, height=64)
WIDTHS = {"clip_l": 32, "clip_g": 64}  # the small SDXL's text_encoder / text_encoder_2 widths


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def zz_circles(tmp_path_factory) -> Path:
    folder = write_circles(tmp_path_factory.mktemp("zz"))
    for txt in folder.glob("*.txt"):
        txt.write_text(txt.read_text().replace("white circle", "<zz> circle"))
    return folder


def ti_recipe(data: Path, out: Path, **changes):
    settings = {
        "adapter__method": "textual_inversion",
        "embedding__tokens": ["<zz>"],
        "embedding__init_words": ["red"],
        "embedding__vectors": 2,
        "embedding__learning_rate": 5e-2,
        "train__steps": 3,
        "train__batch_size": 1,
        "data__resolution": 64,
        "output__save_dtype": "fp32",
        **changes,
    }
    return small_recipe(data, out, **settings)


@pytest.fixture(scope="module")
def ti_run(zz_circles, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_ti")
    run = setup_run(ti_recipe(zz_circles, out), base=small_base("sdxl"), log=quiet)
    start = {c: m.vectors("<zz>") for c, m in run.trained.items()}
    result = train(run, log=quiet)
    return run, result, start, out


def test_textual_inversion_trains_only_the_new_rows_of_both_encoders(ti_run):
    run, _, start, _ = ti_run
    assert set(run.trained) == {"embedding", "embedding_2"}
    fresh = small_base("sdxl")  # the same seed: the base before training
    for component, key in (("text_encoder", "embedding"), ("text_encoder_2", "embedding_2")):
        encoder = getattr(run.base, component)
        module = encoder.get_input_embeddings()
        assert isinstance(module, PlaceholderEmbedding) and module is run.trained[key]
        now = {k: v for k, v in encoder.state_dict().items() if not k.endswith(".rows")}
        for name, tensor in getattr(fresh, component).state_dict().items():
            mapped = (
                name
                if name in now
                else name.replace("token_embedding.weight", "token_embedding.original.weight")
            )
            assert torch.equal(now[mapped], tensor), (
                f"{component}.{name} changed"
            )  # every other row bit-identical
        assert module.first_new_id == getattr(fresh, component).get_input_embeddings().num_embeddings
        learned = module.vectors("<zz>")
        assert learned.shape == (2, encoder.config.hidden_size)
        assert not torch.equal(learned, start[key]), f"the {component} vectors should train"
    for component in ("unet", "vae"):
        theirs = getattr(run.base, component).state_dict()
        assert all(torch.equal(theirs[k], t) for k, t in getattr(fresh, component).state_dict().items()), (
            component
        )
    # the same token is registered in both tokenizers, with all its vector names
    for tokenizer in (run.base.tokenizer, run.base.tokenizer_2):
        assert {"<zz>", "<zz>_1"} <= set(tokenizer.get_added_vocab())


def test_textual_inversion_exports_the_clip_l_clip_g_file(ti_run):
    run, result, _, out = ti_run
    names = sorted(p.name for p in result.outputs)
    assert names == [
        "README.md",
        "t.toml",
        "zz.diffusers.safetensors",
        "zz.diffusers_2.safetensors",
        "zz.safetensors",
    ]
    metadata, header = read_header(out / "embeddings" / "zz.safetensors")
    assert {k: list(v[1]) for k, v in header.items()} == {"clip_l": [2, 32], "clip_g": [2, 64]}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    data = read_embedding(out / "embeddings" / "zz.safetensors", token="<zz>")
    assert data.is_sdxl and data.format == "kohya"
    assert torch.equal(data.vectors["clip_l"], run.trained["embedding"].vectors("<zz>"))
    assert torch.equal(data.vectors["clip_g"], run.trained["embedding_2"].vectors("<zz>"))
    first = read_embedding(out / "embeddings" / "zz.diffusers.safetensors")
    second = read_embedding(out / "embeddings" / "zz.diffusers_2.safetensors")
    assert first.token == second.token == "<zz>"
    assert torch.equal(first.vectors["text_encoder"], data.vectors["clip_l"])
    assert torch.equal(second.vectors["text_encoder"], data.vectors["clip_g"])


def test_the_file_loads_into_both_encoders_and_conditions_as_trained(ti_run):
    """A fresh base with the file applied encodes the token exactly as the trained placeholders do."""
    run, _, _, out = ti_run
    base = small_base("sdxl")
    apply_embeddings(
        base, read_embeddings([EmbeddingSpec(out / "embeddings" / "zz.safetensors", "<zz>")], base.family)
    )
    with torch.no_grad():
        loaded = encode_conditioning(base, [PROMPT])
        trained = encode_conditioning(run.base, [PROMPT])
        plain = encode_conditioning(small_base("sdxl"), [PROMPT.replace("<zz>", "red")])
    assert torch.equal(loaded.embeds, trained.embeds) and torch.equal(loaded.pooled, trained.pooled)
    assert not torch.allclose(loaded.embeds, plain.embeds)


def test_sample_cli_takes_an_sdxl_embedding(ti_run, tmp_path):
    _, _, _, out = ti_run
    folder = export_base(small_base("sdxl"), tmp_path / "base")
    stream = io.StringIO()
    args = [
        "sample",
        "--base",
        str(folder),
        "--prompt",
        "a <yy> circle",
        "--steps",
        "2",
        "--size",
        "64x64",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "o"),
        "--embedding",
        f"{out / 'embeddings' / 'zz.safetensors'}:<yy>",
    ]
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        rc = main(args)
    assert rc == 0, stream.getvalue()
    from PIL import Image

    png = Image.open(tmp_path / "o" / "sample_3.png")
    assert 'TI hashes: "<yy>: ' in png.info["parameters"]


def test_embeddings_for_another_family_are_refused_and_change_nothing(tmp_path):
    base = small_base("sdxl")
    sd1 = tmp_path / "sd1.safetensors"
    save_kohya_embedding(sd1, torch.randn(1, 32))
    with pytest.raises(
        TunerError, match=r"sd1.safetensors: this is a one-text-encoder embedding .* clip_l \+ clip_g"
    ):
        read_embeddings([EmbeddingSpec(sd1)], base.family)
    bad = tmp_path / "bad.safetensors"  # right clip_l width, wrong clip_g width: neither encoder may change
    save_kohya_embedding(bad, {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 65)})
    sizes = (
        len(base.tokenizer),
        len(base.tokenizer_2),
        base.text_encoder.get_input_embeddings().num_embeddings,
    )
    with pytest.raises(TunerError, match=r"width 65 .* hidden size is 64"):
        apply_embeddings(base, read_embeddings([EmbeddingSpec(bad, "<bad>")]))
    assert (
        len(base.tokenizer),
        len(base.tokenizer_2),
        base.text_encoder.get_input_embeddings().num_embeddings,
    ) == sizes
    tiny_family = small_base("sd15").family
    with pytest.raises(TunerError, match="this is an SDXL embedding"):
        read_embeddings([EmbeddingSpec(bad)], tiny_family)


def test_sdxl_embedding_matches_diffusers_pipeline(ti_run):
    """The same vectors loaded by diffusers (load_textual_inversion into each encoder, as its docs show for
    clip_l/clip_g files) and by tuner's sampler give the same image at the same seed with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    _, _, _, out = ti_run
    path = out / "embeddings" / "zz.safetensors"
    tensors, _ = read_safetensors(path)
    theirs_base = small_base("sdxl")
    pipe = StableDiffusionXLPipeline(
        scheduler=DDIMScheduler.from_config(theirs_base.scheduler_config),
        **theirs_base.components,
        **theirs_base.tokenizers,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(
        tensors["clip_l"], token="<zz>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        tensors["clip_g"], token="<zz>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    theirs = np.asarray(
        pipe(
            PROMPT,
            num_inference_steps=SETTINGS.steps,
            guidance_scale=SETTINGS.cfg,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(7),
        ).images[0]
    ).astype(int)
    base = small_base("sdxl")
    plain = np.asarray(sample_images(base, [PROMPT.replace("<zz>", "red")], [7], SETTINGS)[0]).astype(int)
    apply_embeddings(base, read_embeddings([EmbeddingSpec(path, "<zz>")]))
    ours = np.asarray(sample_images(base, [PROMPT], [7], SETTINGS)[0]).astype(int)
    assert np.abs(ours - theirs).max() <= 2
    assert np.abs(ours - plain).max() > 0, "the learned vectors should change the image"


def test_sdxl_pivotal_exports_lora_and_the_embedding_file(zz_circles, tmp_path):
    recipe = ti_recipe(
        zz_circles,
        tmp_path,
        adapter__method="pivotal",
        adapter__rank=4,
        adapter__train_text_encoder=True,
        embedding__a1111_bundle=True,
        train__steps=2,
    )
    run = setup_run(recipe, base=small_base("sdxl"), log=quiet)
    assert set(run.trained) == {"unet", "text_encoder", "text_encoder_2", "embedding", "embedding_2"}
    groups = {g["name"]: {id(p) for p in g["params"]} for g in run.optimizer.param_groups}
    for rows, encoder in (("embedding", "text_encoder"), ("embedding_2", "text_encoder_2")):
        # the placeholder rows live inside the trained encoder but train only in their own group (own LR)
        assert groups[rows] == {id(run.trained[rows].rows)} and not groups[rows] & groups[encoder]
    start = {c: run.trained[c].vectors("<zz>") for c in ("embedding", "embedding_2")}
    result = train(run, log=quiet)
    assert all(not torch.equal(run.trained[c].vectors("<zz>"), v) for c, v in start.items())
    names = sorted(p.name for p in result.outputs)
    assert names == [
        "README.md",
        "t.bundle.safetensors",
        "t.safetensors",
        "t.toml",
        "zz.diffusers.safetensors",
        "zz.diffusers_2.safetensors",
        "zz.safetensors",
    ]
    _, header = read_header(tmp_path / "t.safetensors")
    prefixes = {k.split("_")[1] for k in header}
    assert prefixes == {"unet", "te1", "te2"} and not any(k.startswith("bundle_emb") for k in header)
    bundle, _ = read_safetensors(tmp_path / "t.bundle.safetensors")
    assert set(bundle) - set(header) == {"bundle_emb.<zz>.clip_l", "bundle_emb.<zz>.clip_g"}
    assert torch.equal(bundle["bundle_emb.<zz>.clip_g"], run.trained["embedding_2"].vectors("<zz>"))
    bundled = read_embedding(tmp_path / "t.bundle.safetensors")
    assert bundled.format == "bundle" and bundled.is_sdxl and bundled.token == "<zz>"
    # the sampler takes the pair: embedding first (the LoRA's text-encoder layers wrap the new rows too)
    base = small_base("sdxl")
    apply_embeddings(
        base, read_embeddings([EmbeddingSpec(tmp_path / "embeddings" / "zz.safetensors", "<zz>")])
    )
    loaded = load_loras_for(base, [LoraSpec(tmp_path / "t.safetensors")])
    assert {k.split(":")[0] for k in loaded[0].weights.modules} == {"unet", "text_encoder", "text_encoder_2"}
