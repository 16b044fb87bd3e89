"""A 2-step smoke run of the pretraining command, pause/resume, and the model card."""

from __future__ import annotations

import json

import pytest
import torch

from tuner.cli import main
from tuner.tiny.pretrain import PretrainSettings, draw_captions, pretrain_scenes, pretrain_tiny
from tuner.tiny.world import HELD_OUT


def test_pretrain_scenes_exclude_held_out_pairs():
    scenes = pretrain_scenes()
    assert len(scenes) == 8 * 8 * 7 * 2 * 3 - len(HELD_OUT) * 7 * 2 * 3
    assert not {(s.shape, s.color) for s in scenes} & set(HELD_OUT)


def test_training_captions_drop_the_colour_word_at_the_set_rate():
    import numpy as np

    scenes = pretrain_scenes() * 2  # 4704 captions: the rates below are within 4 standard errors

    def rates(color_drop: float) -> tuple[float, float, float]:
        settings = PretrainSettings(color_drop=color_drop, caption_dropout=0.1)
        captions = draw_captions(np.random.default_rng(0), scenes, settings)
        kept = [(c, s) for c, s in zip(captions, scenes) if c]
        no_colour = np.mean([f" {s.color} {s.shape}" not in c for c, s in kept])
        return 1 - len(kept) / len(scenes), no_colour, np.mean([c.startswith(f"a {s.size} ") for c, s in kept])

    empty, no_colour, with_size = rates(0.25)
    assert abs(empty - 0.1) < 0.02 and abs(no_colour - 0.25) < 0.03 and abs(with_size - 0.7) < 0.03
    assert rates(0.0)[1] == 0.0  # WORLD.md's captions always name the colour
    colourless = draw_captions(np.random.default_rng(1), scenes, PretrainSettings(color_drop=1.0, caption_dropout=0))
    assert all(c.split(" on a ")[0] in (f"a {s.shape}", f"a {s.size} {s.shape}") for c, s in zip(colourless, scenes))


def test_pretrain_pauses_and_resumes(tmp_path):
    settings = PretrainSettings(vae_steps=2, vae_batch=2, steps=2, batch=2, checkpoint_every=1, scene_limit=16,
                                time_limit_min=1e-6)
    assert pretrain_tiny(tmp_path, settings, log=lambda *_: None) is None  # paused after one VAE step
    assert (tmp_path / "vae_state.pt").exists() and not (tmp_path / "vae").exists()
    settings.time_limit_min = 0
    final = pretrain_tiny(tmp_path, settings, log=lambda *_: None)
    assert final is not None and (final / "model_index.json").exists()
    assert len(json.loads((tmp_path / "history.json").read_text())["loss"]) == 2


def _snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ab = alphas_cumprod.double()
    return ab / (1 - ab)


def test_shifted_schedule_divides_every_snr_and_loads_in_every_sampler():
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    from tuner.models.tiny import SCHEDULER_CONFIG, scheduler_config

    assert scheduler_config(1.0) == SCHEDULER_CONFIG
    reference = _snr(DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod)
    for cls in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler):
        shifted = cls.from_config(scheduler_config(4.0)).alphas_cumprod
        ratio = _snr(shifted)[:-1] / reference[:-1]
        assert torch.allclose(ratio, torch.full_like(ratio, 0.25), rtol=1e-4), cls.__name__
        assert float(shifted[-1]) < 1e-7  # still zero terminal SNR (Euler keeps its 2^-24 guard)
    with pytest.raises(ValueError, match="snr_shift = -1"):
        scheduler_config(-1.0)


def test_pretrain_with_finer_latents_builds_a_base_that_samples(tmp_path, monkeypatch):
    """``--latent-factor 2``: a 2x VAE (32x32 latents) and a UNet with one more stage train end to end (the
    UNet's object weights follow the latent size) on the schedule with SNR / 4, which the exported base
    carries; the base loads from the folder with that factor and samples 64 px images; continuing the run
    with the other factor, or another SNR shift, is refused, naming the settings file."""
    import tuner.train.objective as objective
    from tuner.errors import TunerError
    from tuner.models.base import load_base
    from tuner.models.tiny import SCHEDULER_CONFIG
    from tuner.sample.sampler import SampleSettings, sample_images

    trained_on = []
    real_add_noise = objective.add_noise

    def recording_add_noise(latents, noise_scheduler, generator, **kw):
        trained_on.append(noise_scheduler.alphas_cumprod.clone())
        return real_add_noise(latents, noise_scheduler, generator, **kw)

    monkeypatch.setattr(objective, "add_noise", recording_add_noise)
    settings = PretrainSettings(vae_steps=1, vae_batch=2, steps=1, batch=2, scene_limit=16, latent_factor=2)
    final = pretrain_tiny(tmp_path, settings, log=lambda *_: None)
    assert json.loads((tmp_path / "settings.json").read_text())["snr_shift"] == 4.0
    base = load_base(str(final))
    assert base.vae_scale_factor == 2 and base.unet.config.sample_size == 32
    assert len(base.unet.config.block_out_channels) == 4
    from diffusers import DDPMScheduler

    exported = DDPMScheduler.from_config(base.scheduler_config).alphas_cumprod
    assert len(trained_on) == 1 and torch.equal(trained_on[0], exported)
    ratio = _snr(exported)[:-1] / _snr(DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod)[:-1]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.25), rtol=1e-4)
    (image,) = sample_images(base, ["a red circle on a blue background"], [0], SampleSettings(steps=2))
    assert image.size == (64, 64)
    small = dict(vae_steps=1, vae_batch=2, steps=1, batch=2, scene_limit=16)
    with pytest.raises(TunerError, match=r"settings\.json.*latent_factor = 2, not 4.*--latent-factor 2"):
        pretrain_tiny(tmp_path, PretrainSettings(**small), log=lambda *_: None)
    with pytest.raises(TunerError, match=r"settings\.json.*snr_shift = 4.0, not 1.0.*--snr-shift 4"):
        pretrain_tiny(tmp_path, PretrainSettings(**small, latent_factor=2, snr_shift=1.0), log=lambda *_: None)


def test_unet_counterparts_of_a_factor_2_unet_in_a_factor_4_one():
    from tuner.tiny.pretrain import unet_counterpart

    assert unet_counterpart("down_blocks.1.attentions.0.proj_in.weight", 4, 2) == "down_blocks.0.attentions.0.proj_in.weight"
    assert unet_counterpart("down_blocks.3.resnets.0.conv1.weight", 4, 2) == "down_blocks.2.resnets.0.conv1.weight"
    assert unet_counterpart("down_blocks.0.resnets.0.conv1.weight", 4, 2) == "down_blocks.-1.resnets.0.conv1.weight"
    for name in ("up_blocks.2.resnets.0.conv1.weight", "mid_block.attentions.0.proj_out.weight", "conv_in.weight"):
        assert unet_counterpart(name, 4, 2) == name
    assert unet_counterpart("down_blocks.1.resnets.0.conv1.weight", 4, 4) == "down_blocks.1.resnets.0.conv1.weight"


def test_pretrain_from_the_embedded_base_starts_from_its_weights(tmp_path):
    """``--init-from tiny`` with ``--latent-factor 2``: the text encoder and the factor-4 UNet's stages (now the
    inner ones) start from the embedded base. With a learning rate of 0 nothing moves, so the exported base
    still holds them exactly; the new outer stage is not the base's; a base of another family is refused."""
    from tuner.errors import TunerError
    from tuner.models.base import load_base

    settings = PretrainSettings(vae_steps=1, vae_batch=2, steps=1, batch=2, scene_limit=16, latent_factor=2, lr=0.0,
                                init_from="tiny")
    lines = []
    final = pretrain_tiny(tmp_path, settings, log=lines.append)
    assert any("start from tiny (latent factor 4): the text encoder whole, 311 of 364 UNet tensors" in str(line)
               for line in lines), lines
    again = []
    pretrain_tiny(tmp_path, settings, log=again.append)  # continuing: the checkpoint's weights, no second copy
    assert not any("start from" in str(line) for line in again) and any("resumed at step 1" in str(line) for line in again)
    shipped, ours = load_base("tiny"), load_base(str(final))
    for name, value in shipped.text_encoder.state_dict().items():
        assert torch.equal(ours.text_encoder.state_dict()[name], value), name
    theirs, mine = shipped.unet.state_dict(), ours.unet.state_dict()
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", "mid_block.resnets.0.conv1.weight",
                 "up_blocks.1.attentions.0.proj_out.weight", "time_embedding.linear_2.weight"):
        twin = name.replace("down_blocks.0.", "down_blocks.1.")
        assert torch.equal(mine[twin], theirs[name]), name
    assert mine["conv_in.weight"].shape != theirs["conv_in.weight"].shape
    assert not torch.equal(mine["up_blocks.2.resnets.1.conv1.weight"][:, :64], theirs["up_blocks.2.resnets.1.conv1.weight"][:, :64])
    with pytest.raises(TunerError, match="--init-from .*sd15"):
        pretrain_tiny(tmp_path / "other", PretrainSettings(**{**settings.__dict__, "init_from": str(tmp_path / "sd15")}),
                      log=lambda *_: None)


def test_pretrain_command_smoke(tmp_path, monkeypatch):
    import tuner.tiny.pretrain as pretrain

    real = pretrain.pretrain_scenes
    monkeypatch.setattr(pretrain, "pretrain_scenes", lambda: real()[::150])
    code = main(["pretrain-tiny", "--out", str(tmp_path), "--steps", "2", "--vae-steps", "2", "--batch-size", "2",
                 "--decoder-steps", "2", "--fg-weight", "4", "--color-drop", "0.3", "--eval-n", "2"])
    assert code == 0
    card = (tmp_path / "final" / "MODEL_CARD.md").read_text()
    assert "seen prompts (n = 2)" in card and "held-out pairs (n = 8)" in card and "pretrain-tiny" in card
    assert "AutoencoderKL with 4x downsampling" in card
    assert json.loads((tmp_path / "settings.json").read_text())["fg_weight"] == 4.0 and "--fg-weight 4" in card
    assert "under the object weighted 5x" in card
    assert json.loads((tmp_path / "settings.json").read_text())["color_drop"] == 0.3 and "--color-drop 0.3" in card
    assert "the colour word with p = 0.3" in card
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["vae_augment"] == 0.5 and settings["vae_fg_weight"] == 4.0  # the command's defaults
    assert "object pixels weighted 5x" in card and "50% of its images world geometry in free colours" in card


def test_decoder_stage_keeps_the_latent_space(tmp_path):
    """Stage 3 trains the decoder only: the encoder (whose latents the UNet learned) stays bit-identical."""
    import torch
    from diffusers import AutoencoderKL

    settings = PretrainSettings(vae_steps=2, vae_batch=2, steps=1, batch=2, decoder_steps=2, decoder_batch=4,
                                checkpoint_every=1, scene_limit=16)
    final = pretrain_tiny(tmp_path, settings, log=lambda *_: None)
    assert final is not None and (tmp_path / "decoder_state.pt").exists()
    before = AutoencoderKL.from_pretrained(tmp_path / "vae")
    after = AutoencoderKL.from_pretrained(final / "vae")
    for name, tensor in before.state_dict().items():
        same = torch.equal(tensor, after.state_dict()[name])
        assert same == (not name.startswith(("decoder.", "post_quant_conv."))), name


def test_codec_augment_draws_world_geometry_in_free_colours():
    import numpy as np

    from tuner.tiny.pretrain import codec_augment

    x = codec_augment(np.random.default_rng(0), 8)
    assert x.shape == (8, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    pixels = ((x.permute(0, 2, 3, 1).reshape(-1, 3) + 1) * 127.5).round().unique(dim=0)
    assert len(pixels) > 16  # not the eight palette colours
    same, masks = codec_augment(np.random.default_rng(0), 8, with_masks=True)
    assert torch.equal(same, x) and masks.shape == (8, 1, 64, 64) and masks.dtype == torch.bool
    for image, mask in zip(x, masks[:, 0]):  # the mask is exactly the pixels not in the background colour
        differs = (image != image[:, :1, :1]).any(dim=0)
        assert torch.equal(differs, mask), (differs ^ mask).sum()


def test_vae_reconstruction_loss_weights_the_object():
    """``--vae-fg-weight``: an error on an object pixel (or one pixel beside it) costs 1 + W times an error on
    the background; W = 0 is the plain MSE + 0.5 L1 mean."""
    import torch.nn.functional as F

    from tuner.tiny.pretrain import reconstruction_loss

    x = torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 2:4, 2:4] = True
    on, edge, off = x.clone(), x.clone(), x.clone()
    on[0, :, 2, 2], edge[0, :, 1, 2], off[0, :, 7, 7] = 1.0, 1.0, 1.0
    for recon in (on, off):
        plain = reconstruction_loss(recon, x, mask, 0.0)
        assert torch.allclose(plain, F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x))
    w_on, w_edge, w_off = (reconstruction_loss(r, x, mask, 4.0) for r in (on, edge, off))
    assert torch.allclose(w_on, 5 * w_off) and torch.allclose(w_edge, w_on)


def test_object_weights_cover_the_object_in_latent_space():
    """``--fg-weight``: latent pixels over the object weigh 1 + W, the rest 1 (checked against the mask)."""
    import torch.nn.functional as F

    from tuner.tiny.pretrain import _object_weights
    from tuner.tiny.world import Scene, shape_mask

    small = Scene(shape="square", color="red", background="blue", size="small", position="left")
    large = Scene(shape="circle", color="red", background="blue", size="large", position="right")
    w = _object_weights([small, large], 4.0)
    assert w.shape == (2, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 5.0}
    for i, s in enumerate((small, large)):
        mask = torch.from_numpy(shape_mask(s.shape, s.size_px, s.cx)).float()
        covered = F.avg_pool2d(mask[None, None], 4)[0, 0] > 0
        assert (w[i, 0][covered] == 5.0).all()  # every latent pixel the object touches is weighted
        assert (w[i, 0][:, :2] == 1.0).all() if s.position == "right" else (w[i, 0][:, -2:] == 1.0).all()
    assert (w[1] > 1).sum() > (w[0] > 1).sum()  # the large object covers more
    fine = _object_weights([small, large], 4.0, 2)  # --latent-factor 2: 32x32 latents
    assert fine.shape == (2, 1, 32, 32) and (fine[1] > 1).sum() > (fine[0] > 1).sum()


def test_weighted_diffusion_loss():
    """A weight map turns the per-sample MSE into a weighted mean; all-ones weights change nothing."""
    from diffusers import DDPMScheduler

    from tuner.train.objective import diffusion_loss

    sched = DDPMScheduler(num_train_timesteps=10)
    pred, target = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    target[:, :, 0, 0] = 2.0  # error 4 on one latent pixel (of 16) per channel
    t = torch.tensor([1, 5])
    plain = diffusion_loss(pred, target, t, sched, prediction_type="epsilon")
    ones = diffusion_loss(pred, target, t, sched, prediction_type="epsilon", weight=torch.ones(2, 1, 4, 4))
    assert torch.allclose(plain, torch.full((2,), 4.0 / 16)) and torch.equal(plain, ones)
    w = torch.ones(2, 1, 4, 4)
    w[:, :, 0, 0] = 5.0  # the erring pixel weighs 5: 5*4 / (5 + 15)
    weighted = diffusion_loss(pred, target, t, sched, prediction_type="epsilon", weight=w)
    assert torch.allclose(weighted, torch.full((2,), 20.0 / 20))


def test_two_processes_pretrain_like_one(tmp_path):
    """``--processes 2`` splits every batch over two gloo processes: after 2 VAE and 2 UNet steps the weights
    and losses equal one process's up to float rounding, and only the launching process writes the card."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from tuner.models.tiny import VAE_CONFIG

    one, two = tmp_path / "one", tmp_path / "two"
    # The command's defaults are PretrainSettings' (one process here: no card, the card is checked below).
    assert pretrain_tiny(one, PretrainSettings(steps=2, vae_steps=2, batch=4, scene_limit=16), log=lambda *_: None)
    assert main(["pretrain-tiny", "--out", str(two), "--processes", "2", "--steps", "2", "--vae-steps", "2",
                 "--batch-size", "4", "--scene-limit", "16", "--eval-n", "2"]) == 0
    weights = {}
    for part in ("vae", "unet", "text_encoder"):
        (a,), (b,) = (list((root / "final" / part).glob("*.safetensors")) for root in (one, two))
        weights[part] = load_file(a), load_file(b)
        assert weights[part][0].keys() == weights[part][1].keys()
        # Adam's first steps move every weight by about +-lr; a weight whose gradient is float noise (a conv
        # bias before a GroupNorm) may go either way in either run: at most 2 x (sum of the two steps' lr).
        atol = 2 * (2e-3 / 100 * 3) if part == "vae" else 2 * (1e-3 / 200 * 3)
        for key, tensor in weights[part][0].items():
            torch.testing.assert_close(weights[part][1][key], tensor, rtol=0, atol=atol, msg=f"{part}: {key}")
    # The VAE's two steps moved it: the two runs moved it the same way. Half-batch gradients without the
    # average would give different Adam steps for most weights.
    torch.manual_seed(0)  # the VAE's initialisation in pretraining
    init = AutoencoderKL(**VAE_CONFIG).state_dict()
    d1, d2 = (torch.cat([(w[k] - init[k]).flatten() for k in init]) for w in weights["vae"])
    assert d1.norm() > 0 and (d2 - d1).norm() < 0.02 * d1.norm()
    losses = [json.loads((root / "history.json").read_text())["loss"] for root in (one, two)]
    assert len(losses[1]) == 2 and all(abs(x - y) < 1e-5 for x, y in zip(*losses))
    card = (two / "final" / "MODEL_CARD.md").read_text()
    assert "--processes 2" in card and json.loads((two / "wall_minutes.json").read_text())


def test_base_card_says_where_a_warm_started_base_began(tmp_path):
    from tuner.tiny.card import write_card

    common = dict(history={"loss": [0.1]}, minutes=100, command="tuner pretrain-tiny", evals={})
    scratch = write_card(tmp_path, settings={"latent_factor": 4, "snr_shift": 1.0}, **common).read_text()
    assert "trained from scratch by tuner" in scratch and "started from" not in scratch and "divided" not in scratch
    warm = write_card(tmp_path, settings={"latent_factor": 2, "snr_shift": 4.0, "init_from": "tiny"}, **common).read_text()
    assert "cross-attention) trained by tuner" in warm and "Its text encoder and UNet started from the tiny base `tiny`" in warm
    assert "with every SNR divided by 4" in warm and "starting base's own training not counted" in warm
