"""Memory features (issue 8.3): prompt/latent caching with the frozen components off the device, attention
kernel, channels_last, frozen weights in the autocast dtype, fp32 VAE, Adafactor, fused backward.

On the CPU the memory effect itself is nil; these tests check the bookkeeping (dtypes, devices, what
training still calls) and that every switch gives the same training where it should."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import small_recipe

from tuner.config.load import check_recipe
from tuner.errors import TunerError
from tuner.optim.fused import FusedBackward
from tuner.optim.memory import attention_kinds
from tuner.optim.optimizers import build_optimizer, build_schedule
from tuner.plan.estimate import plan_recipe
from tuner.plan.skeleton import build_skeleton
from tuner.train import loop
from tuner.train.caches import fixed_captions
from tuner.train.loop import prepare_caches, train
from tuner.train.setup import setup_run

QUIET = {"log": lambda *_: None}


def _calls(module: torch.nn.Module) -> list[int]:
    """A list that grows by one at every forward call of ``module``."""
    seen: list[int] = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


def test_cached_prompts_and_latents_leave_the_device_and_are_never_recomputed(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path, train__steps=2), **QUIET)
    prepare_caches(run, **QUIET)
    assert run.offloaded == ["vae", "text_encoder"]
    assert next(run.base.vae.parameters()).device.type == "cpu"
    assert next(run.base.text_encoder.parameters()).device.type == "cpu"
    assert set(run.prompt_cache) == {item.caption for item in run.index.items}
    te_calls, vae_calls = _calls(run.base.text_encoder), _calls(run.base.vae.encoder)
    train(run, **QUIET)
    assert te_calls == [] and vae_calls == []
    prepare_caches(run, **QUIET)  # idempotent: nothing re-encoded, nothing listed twice
    assert run.offloaded == ["vae", "text_encoder"] and te_calls == []


def test_cached_and_uncached_prompts_and_latents_give_the_same_losses(circles, tmp_path):
    losses = []
    for cache in (True, False):
        recipe = small_recipe(circles, tmp_path / str(cache), train__steps=3, train__cache_latents=cache,
                              train__cache_prompts=cache, data__caption_dropout=0.5)
        run = setup_run(recipe, **QUIET)
        train(run, **QUIET)
        assert run.offloaded == (["vae", "text_encoder"] if cache else [])
        losses.append(run.history["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_caption_dropout_is_cacheable_but_tag_shuffling_is_not(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path, data__caption_dropout=0.3), **QUIET)
    assert fixed_captions([run.dataset])[-1] == ""
    run = setup_run(small_recipe(circles, tmp_path, train__steps=1, data__shuffle_tags=True), **QUIET)
    assert fixed_captions([run.dataset]) is None
    notes: list[str] = []
    prepare_caches(run, log=notes.append)
    assert run.offloaded == ["vae"] and run.prompt_cache == {}
    assert any("shuffle_tags" in n for n in notes)
    train(run, **QUIET)  # captions encoded as they come, by the encoder still on the device
    assert run.prompt_cache


def test_trained_text_encoder_is_never_cached(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path, adapter__train_text_encoder=True), **QUIET)
    prepare_caches(run, **QUIET)
    assert run.prompt_cache is None and run.offloaded == ["vae"]


def test_attention_switch(circles, tmp_path):
    losses = {}
    for kind in ("sdpa", "eager"):
        run = setup_run(small_recipe(circles, tmp_path / kind, train__steps=2, train__attention=kind), **QUIET)
        assert attention_kinds(run.base.unet) == {kind} and attention_kinds(run.base.vae) == {kind}
        train(run, **QUIET)
        losses[kind] = run.history["loss"]
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-4)


def test_channels_last_trains_the_same(circles, tmp_path):
    losses = []
    for on in (False, True):
        run = setup_run(small_recipe(circles, tmp_path / str(on), train__steps=2, train__channels_last=on), **QUIET)
        conv = run.base.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == on
        train(run, **QUIET)
        losses.append(run.history["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_frozen_weights_follow_the_autocast_dtype(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path, train__mixed_precision="bf16"), **QUIET)
    frozen = [p for m in (run.base.unet, run.base.text_encoder, run.base.vae) for p in m.parameters()
              if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert run.params and all(p.dtype == torch.float32 for p in run.params)  # LoRA factors: fp32 masters

    run = setup_run(small_recipe(circles, tmp_path, train__mixed_precision="bf16", model__vae_dtype="fp32"), **QUIET)
    assert run.base.vae.dtype == torch.float32 and run.base.unet.conv_in.weight.dtype == torch.bfloat16
    run = setup_run(small_recipe(circles, tmp_path, train__mixed_precision="bf16", train__weight_dtype="fp32"),
                    **QUIET)
    assert all(p.dtype == torch.float32 for p in run.base.unet.parameters())


def test_bf16_training_with_half_weights_trains_and_previews(circles, tmp_path):
    recipe = small_recipe(circles, tmp_path, train__steps=1, train__mixed_precision="bf16",
                          preview__every=1, preview__prompts=["a white circle"], preview__steps=2)
    run = setup_run(recipe, **QUIET)
    result = train(run, **QUIET)
    assert torch.isfinite(torch.tensor(run.history["loss"])).all()
    assert (tmp_path / "previews" / "step_000001.png").is_file() and result.outputs


def _forward_growth(circles, out) -> tuple[int, int]:
    """(bytes of live tensors added by one forward pass of a bf16, checkpointed full fine-tune, measured at
    the UNet's last line; bytes of one bf16 copy of the trained weights)."""
    from tuner.plan.measure import TensorMemory

    recipe = small_recipe(circles, out, train__steps=1, adapter__method="dreambooth",
                          train__gradient_checkpointing=True, train__mixed_precision="bf16")
    run = setup_run(recipe, **QUIET)
    prepare_caches(run, **QUIET)
    grown: list[int] = []
    with TensorMemory("cpu", trainable=run.params, optimizer=run.optimizer) as mem:
        start = mem.current
        hook = run.base.unet.register_forward_hook(lambda *_: grown.append(mem.current - start))
        loop.compute_loss(run, 0, torch.Generator().manual_seed(0))
        hook.remove()
    return grown[0], 2 * sum(p.numel() for p in run.params)


def test_autocast_keeps_no_half_copy_of_the_trained_weights(circles, tmp_path, monkeypatch):
    """With autocast's cast cache (torch's default) a bf16 copy of every fp32 trained weight lives until the
    forward pass ends, past gradient checkpointing: one more model copy for a full fine-tune."""
    import accelerate.utils

    without_cache, copy = _forward_growth(circles, tmp_path / "a")
    default = accelerate.utils.AutocastKwargs
    monkeypatch.setattr(accelerate.utils, "AutocastKwargs", lambda **_: default())  # torch's default: cache
    with_cache, _ = _forward_growth(circles, tmp_path / "b")
    assert with_cache - without_cache > 0.6 * copy, (with_cache, without_cache, copy)


def _bf16_lora_run(circles, out) -> tuple[list[float], int]:
    """(losses, tensor copies) of 2 bf16 LoRA steps with checkpointing, preview at the end."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    recipe = small_recipe(circles, out, train__steps=2, train__mixed_precision="bf16",
                          train__gradient_checkpointing=True, preview__every=2,
                          preview__prompts=["a white circle"], preview__steps=2)
    run = setup_run(recipe, **QUIET)
    prepare_caches(run, **QUIET)
    with Copies():
        train(run, **QUIET)
    return run.history["loss"], Copies.n


def test_adapter_input_casts_are_skipped_under_autocast(circles, tmp_path, monkeypatch):
    """peft casts a bf16 input up to the fp32 adapter and autocast casts it back down: skipped inside the
    training step (forward and checkpointed recompute), with the same losses; previews outside autocast
    still get the casts they need (they would fail with mixed dtypes otherwise)."""
    import tuner.train.setup as setup

    losses, copies = _bf16_lora_run(circles, tmp_path / "a")
    assert (tmp_path / "a" / "previews" / "step_000002.png").is_file()
    monkeypatch.setattr(setup, "adapter_layers", lambda _m: [])
    losses_cast, copies_cast = _bf16_lora_run(circles, tmp_path / "b")
    assert losses == losses_cast
    assert copies < 0.7 * copies_cast, (copies, copies_cast)


def test_fp16_on_cpu_keeps_fp32_weights(circles, tmp_path):
    """accelerate runs no fp16 autocast on the CPU: half weights would then meet fp32 activations."""
    notes: list[str] = []
    run = setup_run(small_recipe(circles, tmp_path, train__mixed_precision="fp16"), log=notes.append)
    assert run.base.unet.conv_in.weight.dtype == torch.float32
    assert any("frozen weights stay fp32" in n for n in notes)


def test_nan_latents_name_the_fp32_vae_fix(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path), **QUIET)
    with torch.no_grad():
        run.base.vae.encoder.conv_in.weight.fill_(float("inf"))
    with pytest.raises(TunerError, match='model.vae_dtype = "fp32"'):
        prepare_caches(run, **QUIET)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _steps(model, opt, sched, steps: int, start: int = 0) -> None:
    for k in range(start, start + steps):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(k))
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "adamw8bit"])
def test_fused_backward_equals_the_normal_step(name):
    results = []
    for fused in (False, True):
        m = _mlp()
        groups = [{"params": list(m[0].parameters()), "lr": 1e-2}, {"params": list(m[2].parameters()), "lr": 3e-3}]
        make = functools.partial(build_optimizer, name, weight_decay=1e-2)
        opt = FusedBackward(groups, make) if fused else make(groups)
        sched = build_schedule(opt, "cosine", warmup_steps=2, total_steps=8)
        _steps(m, opt, sched, 8)
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_state_dict_resumes_in_either_form():
    """A checkpoint of the fused optimizer continues unfused (and back) exactly like an unbroken run."""
    def build(model, fused):
        make = functools.partial(build_optimizer, "adamw")
        groups = [{"params": list(model.parameters()), "lr": 1e-2}]
        opt = FusedBackward(groups, make) if fused else make(groups)
        return opt, build_schedule(opt, "constant", warmup_steps=0, total_steps=8)

    ref = _mlp()
    opt, sched = build(ref, False)
    _steps(ref, opt, sched, 6)
    for first, second in ((True, False), (False, True)):
        m = _mlp()
        opt, sched = build(m, first)
        _steps(m, opt, sched, 3)
        state = opt.state_dict()
        opt2, sched2 = build(m, second)
        if isinstance(opt, FusedBackward):
            opt.remove_hooks()
        opt2.load_state_dict(state)
        _steps(m, opt2, sched2, 3, start=3)
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_backward_skips_a_non_finite_gradient():
    m = _mlp()
    opt = FusedBackward([{"params": list(m.parameters()), "lr": 1e-2}], functools.partial(build_optimizer, "adamw"))
    before = m[0].weight.detach().clone()
    (m(torch.randn(2, 8)).sum() + m[0].weight.sum() * float("nan")).backward()
    assert torch.equal(m[0].weight, before) and m[0].weight.grad is None
    assert opt.grad_norm != opt.grad_norm  # NaN
    opt.zero_grad()
    assert opt.grad_norm == 0.0


def test_fused_dreambooth_matches_the_unfused_run(circles, tmp_path):
    weights = []
    for fused in (False, True):
        recipe = small_recipe(circles, tmp_path / str(fused), adapter__method="dreambooth", train__steps=3,
                              train__max_grad_norm=0.0, optim__fused_backward=fused, optim__learning_rate=1e-4)
        run = setup_run(recipe, **QUIET)
        assert isinstance(run.optimizer, FusedBackward) == fused
        train(run, **QUIET)
        weights.append({k: v.detach().clone() for k, v in run.base.unet.state_dict().items()})
        assert run.history["loss"]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fused_backward_nan_loss_changes_nothing(circles, tmp_path, monkeypatch):
    recipe = small_recipe(circles, tmp_path, adapter__method="dreambooth", train__steps=4, train__max_bad_steps=2,
                          train__max_grad_norm=0.0, optim__fused_backward=True)
    run = setup_run(recipe, **QUIET)
    before = {k: v.detach().clone() for k, v in run.base.unet.state_dict().items()}
    real = loop.compute_loss
    monkeypatch.setattr(loop, "compute_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(loop.TrainingStopped, match="NaN/inf for 2 steps"):
        train(run, **QUIET)
    after = run.base.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw8bit"])
def test_adafactor_and_8bit_train_lora_and_fused(circles, tmp_path, optimizer):
    run = setup_run(small_recipe(circles, tmp_path, train__steps=2, optim__optimizer=optimizer), **QUIET)
    train(run, **QUIET)
    assert len(run.history["loss"]) == 2
    recipe = small_recipe(circles, tmp_path / "f", adapter__method="dreambooth", train__steps=2,
                          train__max_grad_norm=0.0, optim__optimizer=optimizer, optim__fused_backward=True)
    run = setup_run(recipe, **QUIET)
    start = run.base.unet.conv_in.weight.detach().clone()
    train(run, **QUIET)
    assert not torch.equal(run.base.unet.conv_in.weight, start)


def test_validate_refuses_fused_backward_combinations():
    from tuner.config.schema import Recipe

    r = Recipe()
    r.optim.fused_backward = True
    r.train.gradient_accumulation = 2
    r.train.mixed_precision = "fp16"
    problems = check_recipe(r)  # max_grad_norm is 1.0 by default: a third problem
    assert len(problems) == 3
    assert any("gradient_accumulation = 2" in p for p in problems)
    assert any("max_grad_norm = 0" in p for p in problems)
    assert any("bf16" in p for p in problems)
    r.train.gradient_accumulation, r.train.mixed_precision, r.train.max_grad_norm = 1, "bf16", 0.0
    assert check_recipe(r) == []


@pytest.mark.parametrize(
    ("key", "changes", "words"),
    [
        ("optim.shard_gradients", {"train.mixed_precision": "fp16"}, ("bf16",)),
        ("optim.shard_gradients", {"optim.fused_backward": True, "train.max_grad_norm": 0.0}, ("single-process",)),
        ("train.shard_frozen", {"adapter.method": "dreambooth"}, ("optim.shard_gradients",)),
    ],
)
def test_validate_refuses_sharding_combinations(key, changes, words):
    from tuner.config.schema import Recipe

    r = Recipe()
    section, name = key.split(".")
    setattr(getattr(r, section), name, True)
    assert check_recipe(r) == []  # alone it is fine
    for path, value in changes.items():
        section, name = path.split(".")
        setattr(getattr(r, section), name, value)
    (problem,) = check_recipe(r)
    assert key in problem and all(w in problem for w in words)


def test_plan_follows_the_memory_settings():
    from tuner.config.schema import Recipe

    sk = build_skeleton("tiny", "sd15")
    r = Recipe()
    r.adapter.method = "dreambooth"
    r.train.mixed_precision = "bf16"
    base = plan_recipe(r, skeleton=sk)
    r.optim.fused_backward = True
    fused = plan_recipe(r, skeleton=sk)
    assert fused.component("gradients") < base.component("gradients") / 20  # largest tensor only
    r.train.weight_dtype = "fp32"
    r.train.cache_prompts = False
    kept = plan_recipe(r, skeleton=sk)
    assert kept.component("frozen weights") == 123_060_480 * 4  # the text encoder, fp32, stays on the device
    assert any("weight_dtype" in n for n in kept.notes)
    r.train.cache_latents, r.model.vae_dtype, r.train.weight_dtype = False, "fp32", "auto"
    vae = plan_recipe(r, skeleton=sk)
    assert vae.component("frozen weights") == 123_060_480 * 2 + param_count_vae(sk) * 4


def param_count_vae(sk) -> int:
    return sum(p.numel() for p in sk.vae.parameters())


# --- frozen weights stored narrower than they compute (train.weight_dtype bf16 / fp8) ---------------------------


def _frozen_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5),
    )
    return net.requires_grad_(False)


def _saved_bytes(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(output, bytes of the tensors autograd keeps for backward), one forward pass."""
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    return y, sum(saved)


@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_narrow_frozen_weights_compute_like_their_widened_copy(name):
    import copy

    from tuner.optim.memory import STORAGE, StoredConv2d, StoredLinear, restore_frozen, store_frozen

    net = _frozen_net()
    stored = copy.deepcopy(net)
    loaded = [p.data for p in stored.parameters()]  # kept alive, so no new tensor can reuse their memory
    assert store_frozen(stored, STORAGE[name]) == sum(net[i].weight.numel() for i in (0, 2, 4))
    # nothing points into the loaded tensors any more (a checkpoint's file mapping can then go)
    old = {t.untyped_storage().data_ptr() for t in loaded}
    assert not old & {p.untyped_storage().data_ptr() for p in stored.parameters()}
    assert isinstance(stored[0], StoredConv2d) and isinstance(stored[4], StoredLinear)
    assert all(stored[i].weight.dtype == STORAGE[name] for i in (0, 2, 4))
    widened = copy.deepcopy(stored)
    assert restore_frozen(widened) == sum(net[i].weight.numel() for i in (0, 2, 4))
    assert type(widened[0]) is torch.nn.Conv2d and widened[0].weight.dtype == torch.float32
    for i in (0, 2, 4):  # the rounding: 8 mantissa bits (bf16), 3 bits on a per-channel scale (fp8)
        w, r = net[i].weight, widened[i].weight
        bound = 2**-8 * w.abs() if name == "bf16" else 2**-4 * w.abs() + w.abs().amax() / 448 * 2**-9
        assert ((r - w).abs() <= bound + 1e-12).all()
        assert not torch.equal(r, w)

    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, kept = _saved_bytes(stored, x)
    y_ref, kept_ref = _saved_bytes(widened, x_ref)
    (y.square().sum()).backward()
    (y_ref.square().sum()).backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)  # same maths as the widened weights
    weights = sum(net[i].weight.numel() for i in (0, 2, 4))
    assert kept_ref - kept >= weights * (4 - STORAGE[name].itemsize) - 4 * 8 * 2  # only narrow copies kept


@pytest.mark.parametrize("name", ["fp32", "fp8"])
def test_sharded_frozen_weights_are_the_parts_of_the_stored_weight(name):
    """train.shard_frozen's split (the gather itself runs in tests/test_distributed.py): the parts that
    processes 0..2 keep are the single process's stored weight, flattened, in order, the last one padded."""
    import copy

    from tuner.optim.memory import STORAGE, store_frozen

    dtype = STORAGE.get(name, torch.float32)
    net = _frozen_net()
    whole = copy.deepcopy(net)
    count = store_frozen(whole, dtype)
    parts = []
    for rank in range(3):
        part = copy.deepcopy(net)
        assert store_frozen(part, dtype, rank=rank, world=3) == count  # counts whole weights
        parts.append(part)
    for i in (0, 2, 4):
        shard = parts[0][i].weight_shard
        assert shard.shape == tuple(net[i].weight.shape) and whole[i].weight_shard is None
        n = -(-net[i].weight.numel() // 3)
        assert all(p[i].weight.shape == (n,) and p[i].weight.dtype == dtype for p in parts)
        joined = torch.cat([p[i].weight.view(torch.uint8) for p in parts])
        assert torch.equal(joined[: whole[i].weight.numel() * dtype.itemsize], whole[i].weight.reshape(-1).view(torch.uint8))
        assert not joined[whole[i].weight.numel() * dtype.itemsize :].any()  # zero padding


@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_training_with_narrow_frozen_weights(circles, tmp_path, name):
    from tuner.optim.memory import STORAGE, StoredLinear

    losses = {}
    for dtype in ("auto", name):
        recipe = small_recipe(circles, tmp_path / dtype, train__steps=2, train__weight_dtype=dtype,
                              preview__every=2, preview__prompts=["a white circle"], preview__steps=2)
        run = setup_run(recipe, **QUIET)
        before = {n: p.detach().clone() for n, p in zip(range(len(run.params)), run.params)}
        train(run, **QUIET)
        losses[dtype] = run.history["loss"]
        assert all(p.dtype == torch.float32 for p in run.params)
        assert any(not torch.equal(before[i], p) for i, p in enumerate(run.params))
    stored = [m for m in run.base.unet.modules() if isinstance(m, StoredLinear)]
    assert stored and all(m.weight.dtype == STORAGE[name] for m in stored)
    assert (tmp_path / name / "previews" / "step_000002.png").is_file()
    assert losses[name] == pytest.approx(losses["auto"], rel=0.05)  # the same job, rounded base weights


def test_dreambooth_writes_narrow_stored_weights_back_wide(circles, tmp_path):
    from tuner.models.base import load_base

    recipe = small_recipe(circles, tmp_path, train__steps=1, adapter__method="dreambooth",
                          train__weight_dtype="fp8", train__cache_prompts=False)
    run = setup_run(recipe, **QUIET)
    train(run, **QUIET)
    tuned, original = load_base(str(tmp_path / "model")), load_base(recipe.model.base)
    for (name, w), w0 in zip(tuned.text_encoder.state_dict().items(), original.text_encoder.state_dict().values()):
        assert w.dtype == w0.dtype, name
        assert torch.allclose(w.float(), w0.float(), atol=float(w0.abs().max()) / 16), name


def test_plan_counts_narrow_frozen_weights():
    from tuner.config.schema import Recipe
    from tuner.plan.skeleton import narrow_weights

    sk = build_skeleton("tiny", "sd15")
    r = Recipe()
    fp32 = plan_recipe(r, skeleton=sk).component("frozen weights")
    weights, channels = narrow_weights(sk.unet)
    assert weights > 0.9 * sum(p.numel() for p in sk.unet.parameters())
    r.train.weight_dtype = "bf16"
    assert plan_recipe(r, skeleton=sk).component("frozen weights") == fp32 - 2 * weights
    r.train.weight_dtype = "fp8"
    assert plan_recipe(r, skeleton=sk).component("frozen weights") == fp32 - 3 * weights + 4 * channels


def test_plan_matches_the_narrow_weights_a_run_holds(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path, train__weight_dtype="fp8"), **QUIET)
    held = sum(t.numel() * t.element_size() for t in [*run.base.unet.parameters(), *run.base.unet.buffers()]
               if not t.requires_grad)
    assert plan_recipe(run.recipe).component("frozen weights") == held


def test_paging_out_narrowed_weights_keeps_every_value(tmp_path):
    """store_frozen asks the kernel to reclaim the pages of each wide weight it replaced (so a model loaded
    from a file mapping is never resident twice): the hint must never change what any tensor reads, whether
    the memory is a file mapping (reread from the file) or anonymous."""
    from safetensors.torch import load_file, save_file

    from tuner.optim.memory import _page_out

    torch.manual_seed(0)
    tensors = {"a": torch.randn(512, 1024), "b": torch.randn(3, 5)}
    save_file(tensors, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")
    for t in (*mapped.values(), tensors["a"], tensors["a"][:, :7]):
        _page_out(t)
    assert all(torch.equal(mapped[k], tensors[k]) for k in tensors)
    assert torch.equal(tensors["a"], load_file(tmp_path / "w.safetensors")["a"])
