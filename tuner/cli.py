"""The ``tuner`` command: thin subcommands over library functions (STYLE.md #15)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from tuner import __version__
from tuner.errors import TunerError


def _quiet_libraries() -> None:
    """Nothing here ever downloads; and the libraries' info chatter hides our own output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    for name in ("bitsandbytes", "transformers", "diffusers", "accelerate", "peft", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    if os.environ.get("RANK", "0") != "0":  # a data-parallel worker besides the main one: no progress bars
        os.environ.setdefault("TQDM_DISABLE", "1")  # (tqdm reads it once, when first imported)


def _recipe_from_args(args: argparse.Namespace):
    """The recipe named by ``args`` with its ``--set`` overrides and convenience options applied."""
    from tuner.config.load import load_recipe
    from tuner.config.schema import CLI_SHORTCUTS

    shortcuts: dict[str, object] = {key: getattr(args, opt) for opt, key in CLI_SHORTCUTS.items()}
    shortcuts["data.strict"] = True if args.strict else None
    shortcuts["data.bucketing"] = True if args.bucketing else None
    shortcuts["data.bucket_no_upscale"] = True if args.bucket_no_upscale else None
    return load_recipe(args.recipe, args.set or (), shortcuts)


def _launch_workers(args: argparse.Namespace) -> int | None:
    """With ``--processes N`` in a plain process: start the N workers (they parse the same line under the
    launcher) and return their exit status. None where this process is to do the work itself: one process, or
    a worker of the launcher."""
    from tuner.train.launch import launched_processes, relaunch

    if args.processes > 1 and launched_processes() == 1:
        return relaunch(args.argv, args.processes)
    if args.processes > 1 and launched_processes() != args.processes:
        raise TunerError(f"--processes {args.processes} inside a launcher that started {launched_processes()}: "
                         "drop --processes when launching with accelerate launch or torchrun")
    return None


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe_from_args(args)  # recipe errors are reported once, before any process starts
    code = _launch_workers(args)
    if code is not None:
        return code
    from tuner.train.checkpoint import find_checkpoint
    from tuner.train.loop import restore, train
    from tuner.train.setup import setup_run

    run = setup_run(recipe, recipe_path=args.recipe)
    if args.resume:
        restore(run, find_checkpoint(args.resume, run.out_dir), log=print if run.shard.is_main else lambda _: None)
    result = train(run)
    if not run.shard.is_main:
        return 0
    print(f"done: {result.steps} steps in {result.seconds:.1f} s, final loss {result.final_loss:.4f}")
    for path in result.outputs:
        print(f"wrote {path}")
    if result.report is not None:
        print(f"report: {result.report} (open it in a browser)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tuner.config.load import recipe_to_toml
    from tuner.errors import RecipeError
    from tuner.train.validate import validate_recipe

    try:
        recipe = _recipe_from_args(args)
    except RecipeError as exc:
        print(f"{args.recipe}: {exc}")
        return 2
    result = validate_recipe(recipe)
    print(f"# resolved recipe ({args.recipe})\n{recipe_to_toml(recipe)}")
    if result.arithmetic is not None:
        print(f"step arithmetic: {result.arithmetic.describe()}")
    for note in result.notes:
        print(note)
    if result.problems:
        print(f"\n{len(result.problems)} problem(s):")
        for problem in result.problems:
            print(f"  - {problem}")
        return 2
    print("\nno problems found")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tuner.plan.estimate import GB, fit, format_plan, format_presets, plan_recipe, presets
    from tuner.plan.skeleton import build_skeleton

    recipe = _recipe_from_args(args)
    skeleton = build_skeleton(recipe.model.base, args.family, recipe.model.prediction)
    plan = plan_recipe(recipe, skeleton=skeleton, processes=args.processes)
    fitted = fit(skeleton, recipe, args.vram, processes=args.processes) if args.vram else None
    table = presets(skeleton, recipe, processes=args.processes) if args.vram or args.presets else []
    if args.json:
        doc = {"plan": plan.to_dict()}
        if args.vram:
            doc["vram_gb"], doc["fit"] = args.vram, fitted.to_dict() if fitted else None
        if table:
            doc["presets"] = table
        print(json.dumps(doc, indent=2))
        return 0
    print(format_plan(plan))
    if args.vram:
        print(f"\n--vram {args.vram:g}: ", end="")
        if fitted is None:
            print("nothing tried fits (batch 1, half resolution, every memory setting)")
        elif fitted.settings == plan.settings:
            print(f"fits as is ({fitted.device_bytes / GB:.2f} GB predicted)")
        else:
            from tuner.plan.estimate import changes

            fix = changes(plan.settings, fitted.settings, recipe.train.max_grad_norm)
            print(f"fits with {' '.join('--set ' + c for c in fix)}\n")
            print(format_plan(fitted))
    if table:
        print(f"\npresets (cheapest changes that fit):\n{format_presets(table)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from tuner.models.base import check_base_spec, load_base
    from tuner.sample.generate import (
        EmbeddingSpec,
        LoraSpec,
        apply_embeddings,
        apply_loras,
        generate,
        load_loras_for,
        read_embeddings,
    )
    from tuner.sample.sampler import SampleSettings

    if args.steps < 1 or args.n < 1:
        raise TunerError(f"--steps {args.steps} -n {args.n}: both must be at least 1")
    width = height = 0
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise TunerError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
        if width < 1 or height < 1:
            raise TunerError(f"--size {args.size!r}: width and height must be positive, e.g. 512x512")
    specs = [LoraSpec.parse(s) for s in args.lora or ()]
    for spec in specs:  # before the (slow) base load
        if not spec.path.is_file():
            raise TunerError(f"LoRA file '{spec.path}' does not exist")
    family = check_base_spec(args.base, prediction_type=args.prediction_type) if args.embedding else None
    embeddings = read_embeddings([EmbeddingSpec.parse(s) for s in args.embedding or ()], family)  # fail fast too
    base = load_base(args.base, prediction_type=args.prediction_type)
    for note in base.notes:
        print(f"NOTE: {note}")
    apply_embeddings(base, embeddings)
    loras = load_loras_for(base, specs, lenient=args.lenient)
    apply_loras(base, loras, merge=not args.no_merge)
    settings = SampleSettings(
        steps=args.steps, cfg=args.cfg, sampler=args.sampler, width=width, height=height, negative=args.negative,
        batch_size=args.batch_size,
    )
    paths = generate(
        base, loras, prompt=args.prompt, count=args.n, seed=args.seed, settings=settings, out_dir=Path(args.out),
        embeddings=embeddings,
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from tuner.models.single_file import convert_checkpoint

    print(convert_checkpoint(args.file, args.out).format())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tuner.formats.inspect import format_inspection, inspect_file

    info = inspect_file(args.file)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspection(info))
    return 0


def cmd_export_base(args: argparse.Namespace) -> int:
    from tuner.models.base import export_base, load_base

    base = load_base(args.base)
    out = export_base(base, args.out)
    print(f"wrote diffusers folder {out} (load it with StableDiffusionPipeline.from_pretrained)")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from tuner.adapters.extract import (
        SAVE_DTYPES,
        check_extract_paths,
        extract_lora,
        format_report,
        save_extracted,
    )
    from tuner.models.base import load_base

    check_extract_paths(args.base, args.tuned, args.out)  # before the (slow) model loads
    base, tuned = load_base(args.base), load_base(args.tuned)
    result = extract_lora(base, tuned, rank=args.rank, conv_rank=args.conv_rank, min_diff=args.min_diff,
                          text_encoder=not args.no_text_encoder)
    print(format_report(result))
    digest = save_extracted(args.out, result, dtype=SAVE_DTYPES[args.save_dtype])
    print(f"wrote {args.out} ({len(result.weights.modules)} modules, {args.save_dtype}, sshs {digest[:12]})")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from tuner.adapters.resize import format_resize_report, resize_file

    if not Path(args.file).is_file():
        raise TunerError(f"LoRA file '{args.file}' does not exist")
    from tuner.formats.io import SAVE_DTYPES

    dtype = SAVE_DTYPES[args.save_dtype] if args.save_dtype else None
    result = resize_file(args.file, args.out, rank=args.rank, conv_rank=args.conv_rank, dynamic=args.dynamic,
                         param=args.param, dtype=dtype)
    print(format_resize_report(result))
    print(f"wrote {args.out} (ss_network_dim {result.metadata['ss_network_dim']}, "
          f"ss_network_alpha {result.metadata['ss_network_alpha']})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tuner.formats.convert import convert_file

    result = convert_file(args.file, args.to, args.out, family=args.family, dtype=args.save_dtype,
                          token=args.token, lenient=args.lenient)
    for note in result.notes:
        print(f"note: {note}")
    what = f"{result.modules} modules" if result.modules else "embedding"
    for path in result.outputs:
        print(f"wrote {path} ({result.source_format} -> {result.target}, {what})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tuner.adapters.merge import MergeInput, format_merge_report, merge_into_base, merge_loras

    inputs = [MergeInput.parse(text) for text in args.lora]
    if args.base:
        if args.rank or args.conv_rank:
            raise TunerError("merge: --rank/--conv-rank make one LoRA from several; they do not apply with --base")
        import torch

        single = args.format == "single-file"
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        written, modules = merge_into_base(args.base, inputs, args.out, lenient=args.lenient, single_file=single,
                                           dtype=dtypes[args.save_dtype or "fp16"])
        kind = "single-file checkpoint (LDM layout)" if single else "diffusers folder"
        print(f"merged {len(inputs)} LoRA file(s) ({modules} modules) into {args.base}; wrote {kind} {written} "
              f"(--base {written} works everywhere)")
        return 0
    if args.format == "single-file":
        raise TunerError("merge: --format single-file needs --base (it writes a whole model)")
    result = merge_loras(inputs, args.out, rank=args.rank, conv_rank=args.conv_rank, family=args.family,
                         dtype=args.save_dtype, lenient=args.lenient)
    print(format_merge_report(result))
    print(f"wrote {result.path} ({result.mode}; ss_network_dim {result.metadata['ss_network_dim']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tuner.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, eval_seeds=args.eval_seeds, prior=not args.no_prior)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from tuner.tiny.world import write_personalization_sets, write_world

    if args.personalization:
        for name, paths in write_personalization_sets(args.out).items():
            print(f"wrote {len(paths)} images + captions to {Path(args.out) / name}")
        return 0
    if args.n is None:
        raise TunerError("tuner world: give -n N (how many images), or --personalization")
    paths = write_world(args.out, args.n, seed=args.seed, split=args.split)
    print(f"wrote {len(paths)} images + captions to {args.out} (split {args.split}, seed {args.seed})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tuner.models.base import load_base
    from tuner.sample.generate import (
        EmbeddingSpec,
        LoraSpec,
        apply_embeddings,
        apply_loras,
        load_loras_for,
        read_embeddings,
    )
    from tuner.sample.sampler import SampleSettings
    from tuner.tiny.evaluate import compare, run_eval
    from tuner.train.setup import pick_device

    settings = SampleSettings(steps=args.steps, cfg=args.cfg, sampler=args.sampler, batch_size=args.batch_size)
    options = dict(n=args.n, seeds=args.seeds, seed=args.seed, token=args.token, settings=settings)
    device = pick_device(args.device)
    specs = [LoraSpec.parse(s) for s in args.lora or ()]
    embeddings = read_embeddings([EmbeddingSpec.parse(s) for s in args.embedding or ()])

    def evaluate(with_adapters: bool):
        base = load_base(args.base)
        for note in base.notes:
            print(f"NOTE: {note}", file=sys.stderr)  # stderr: --json keeps stdout a JSON document
        if with_adapters:
            apply_embeddings(base, embeddings)
            apply_loras(base, load_loras_for(base, specs))
        return run_eval(args.mode, base.to(device), progress=True, **options)

    # The prior is about what an adapter destroys: measure it without and with, on the same seeds.
    if args.mode == "prior" and (specs or embeddings):
        result = compare(evaluate(False), evaluate(True))
    else:
        result = evaluate(bool(specs or embeddings))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_table())
    return 0


def cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    import time

    from tuner.train.launch import launched_processes

    started = time.perf_counter()
    if args.batch_size % args.processes:  # before any process starts (pretrain_tiny checks every batch again)
        raise TunerError(f"--batch-size {args.batch_size} does not split over --processes {args.processes}: "
                         "use a multiple")
    code = _launch_workers(args)
    if code is not None:  # the workers trained; this process judges and installs
        return code or _finish_pretrain(args, started)
    from tuner.tiny.pretrain import pretrain_tiny

    final = pretrain_tiny(args.out, _pretrain_settings(args))
    if launched_processes() > 1:
        return 0  # a worker: the launching process writes the card
    return _finish_pretrain(args, started) if final is not None else _paused(args)


def _paused(args: argparse.Namespace) -> int:
    print(f"paused by --time-limit; run the same command again to continue from {args.out}")
    return 0


def _pretrain_settings(args: argparse.Namespace):
    from tuner.tiny.pretrain import PretrainSettings

    return PretrainSettings(
        seed=args.seed, vae_steps=args.vae_steps, steps=args.steps, batch=args.batch_size,
        decoder_steps=args.decoder_steps, fg_weight=args.fg_weight, color_drop=args.color_drop,
        vae_augment=args.vae_augment, vae_fg_weight=args.vae_fg_weight, latent_factor=args.latent_factor,
        snr_shift=args.snr_shift, time_limit_min=args.time_limit, share_cpu=args.share_cpu, scene_limit=args.scene_limit,
        init_from=args.init_from,
    )


def _finish_pretrain(args: argparse.Namespace, started: float) -> int:
    """Judge a finished pretraining, write its model card and (``--install``) install it."""
    import time
    from dataclasses import asdict

    from tuner.models.base import TINY_ASSETS
    from tuner.tiny.card import evaluate_and_install
    from tuner.tiny.pretrain import resolved, wall_minutes

    final = Path(args.out) / "final"
    if not (final / "model_index.json").exists():
        return _paused(args)
    settings = resolved(_pretrain_settings(args))
    evaluate_and_install(
        final, settings=asdict(settings), minutes=wall_minutes(args.out) or (time.perf_counter() - started) / 60,
        command=(f"tuner pretrain-tiny --out {args.out} --steps {args.steps} --vae-steps {args.vae_steps} "
                 f"--decoder-steps {args.decoder_steps} --fg-weight {args.fg_weight:g} --color-drop {args.color_drop:g} "
                 f"--vae-augment {args.vae_augment:g} --vae-fg-weight {args.vae_fg_weight:g} "
                 f"--batch-size {args.batch_size} "
                 + (f"--latent-factor {args.latent_factor} " if args.latent_factor != 4 else "")
                 + (f"--snr-shift {args.snr_shift:g} " if args.snr_shift else "")
                 + (f"--init-from {args.init_from} " if args.init_from else "")
                 + (f"--processes {args.processes} " if args.processes > 1 else "")
                 + f"--seed {args.seed}" + (" --install" if args.install else "")),
        assets_dir=TINY_ASSETS if args.install else None, n_seen=args.eval_n, n_heldout=max(8, args.eval_n // 3),
    )
    return 0


def _add_sampling_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """--steps, --cfg, --sampler and --batch-size, shared by every command that samples images. The sampler
    names repeat ``tuner.sample.sampler.SAMPLERS`` so that ``--help`` does not import torch (a test keeps them
    equal)."""
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=("ddim", "euler", "euler_a", "dpmpp_2m"), default="ddim")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size,
                   help=f"images denoised together (default {batch_size}; an image does not depend on its batch, "
                        "up to float rounding); more is faster on GPUs and small models, 1 keeps memory flat")


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    """The recipe file, ``--set`` and the convenience options (CLI_SHORTCUTS), shared by train and validate."""
    p.add_argument("recipe", help="recipe file (.toml or .yaml), e.g. recipes/tiny/sks_star_lora.toml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--base", help="'tiny', a local diffusers folder or a .safetensors single file (model.base)")
    p.add_argument("--prediction-type", choices=("epsilon", "v"),
                   help="an SD2.x single file: SD2.x 512 (epsilon) or 768-v (v) (model.prediction_type)")
    p.add_argument("--data", help="training image folder (data.path)")
    p.add_argument("--output", help="output folder (output.dir)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument("--resolution", type=int, help="training resolution in px (data.resolution)")
    p.add_argument("--batch-size", type=int, help="batch size (train.batch_size)")
    p.add_argument("--rank", type=int, help="LoRA rank (adapter.rank)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (train.checkpoint_every)")
    p.add_argument("--strict", action="store_true", help="unreadable images are errors, not skips")
    p.add_argument("--bucketing", action="store_true", help="aspect-ratio buckets (data.bucketing = true)")
    p.add_argument("--min-bucket-reso", type=int, help="shortest bucket side in px (data.min_bucket_reso)")
    p.add_argument("--max-bucket-reso", type=int, help="longest bucket side in px (data.max_bucket_reso)")
    p.add_argument("--bucket-no-upscale", action="store_true",
                   help="buckets from the images' own sizes, never enlarging one (data.bucket_no_upscale = true)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuner", description="Personalize latent diffusion models.")
    parser.add_argument("--version", action="version", version=f"tuner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an adapter from a recipe")
    _add_recipe_options(p)
    p.add_argument("--resume", metavar="CKPT|latest", help="resume from a checkpoint folder, or the newest one")
    p.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                   help="data-parallel processes on this machine, each with train.batch_size samples (one per "
                        "GPU; on CPU, gloo); see docs/distributed.md")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a recipe (and its data) without loading any model")
    _add_recipe_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="predict a recipe's GPU memory, FLOPs and time before training")
    _add_recipe_options(p)
    p.add_argument("--vram", type=float, metavar="GB", help="propose the cheapest settings that fit GB, with presets")
    p.add_argument("--presets", action="store_true", help="the cheapest settings for 8, 12, 16 and 24 GB cards")
    p.add_argument("--family", help="plan for this family's architecture (tiny, sd15, sd2, sd2v, sdxl), not the base")
    p.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                   help="data-parallel processes, as for tuner train (figures per process; with "
                        "optim.shard_states each keeps its share of the optimizer states, with "
                        "optim.shard_gradients its share of the gradients too)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sample", help="generate images, optionally with LoRAs")
    p.add_argument("--base", default="tiny", help="'tiny', a local diffusers folder or a single-file checkpoint")
    p.add_argument("--prediction-type", choices=("epsilon", "v"),
                   help="what an SD2.x single-file base predicts (768-v models: v); its weights cannot tell")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="LoRA file and scale (repeatable)")
    p.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding; TOKEN overrides the file's trigger (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("-n", type=int, default=1, help="number of images (seeds SEED..SEED+n-1)")
    p.add_argument("--seed", type=int, default=0)
    _add_sampling_options(p, batch_size=1)
    p.add_argument("--size", metavar="WxH", help="image size (default: the base's native size)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--no-merge", action="store_true", help="keep LoRAs as separate layers instead of merging")
    p.add_argument("--lenient", action="store_true", help="ignore (and count) unknown keys in LoRA files")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("convert-checkpoint", help="convert a .ckpt/.pt checkpoint to .safetensors, safely")
    p.add_argument("file", help="pickle checkpoint (.ckpt, .pt, .pth, .bin)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_convert_checkpoint)

    p = sub.add_parser("inspect", help="describe an adapter file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export-base", help="write a base model as a diffusers folder")
    p.add_argument("base", help="'tiny' or a local diffusers folder")
    p.add_argument("--out", required=True, help="new output folder")
    p.set_defaults(func=cmd_export_base)

    p = sub.add_parser("extract", help="extract a LoRA from a fine-tuned model minus its base (SVD)")
    p.add_argument("--base", required=True, help="the original model: 'tiny' or a local diffusers folder")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (e.g. DreamBooth output), same family")
    p.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1-conv modules (alpha = rank)")
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 convs (LoCon); without it they are left out")
    p.add_argument("--min-diff", type=float, default=0.01,
                   help="keep the text encoder only if some weight changed by more than this")
    p.add_argument("--no-text-encoder", action="store_true", help="extract the UNet only")
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--out", required=True, help="output .safetensors file (kohya format)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("resize", help="lower a LoRA's rank by SVD, keeping its effective scale")
    p.add_argument("file", help="a kohya LoRA/LoCon .safetensors file")
    p.add_argument("--rank", type=int, help="new rank (modules already at or below it are kept)")
    p.add_argument("--conv-rank", type=int, help="new rank of 3x3 conv modules (default: --rank)")
    p.add_argument("--dynamic", choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                   help="choose each module's rank from its singular values (with --param)")
    p.add_argument("--param", type=float, help="sv_ratio: S[0]/S[k] bound (e.g. 10); sv_fro/sv_cumulative: "
                   "fraction kept (e.g. 0.9)")
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), help="default: the file's own")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("convert", help="rewrite a LoRA or embedding file in another tool's layout")
    p.add_argument("file", help="LoRA (.safetensors) or embedding (.safetensors, .pt, .bin) file")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers", "peft", "a1111-pt"),
                   help="LoRA: kohya, diffusers or peft; embedding: kohya, diffusers or a1111-pt")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--family", help="model family of the file (default: from its metadata and tensor widths)")
    p.add_argument("--token", help="embedding: the token to write (default: the file's)")
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), help="default: the file's own")
    p.add_argument("--lenient", action="store_true", help="skip (and count) keys that fit no module")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="merge LoRAs into a base model, or several LoRAs into one")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO]",
                   help="LoRA file and ratio (repeatable)")
    p.add_argument("--base", help="merge into this base ('tiny', a diffusers folder or a single file) and write "
                   "the whole model")
    p.add_argument("--format", choices=("diffusers", "single-file"), default="diffusers",
                   help="with --base: a diffusers folder, or one LDM-layout .safetensors for A1111/ComfyUI "
                        "(in --save-dtype, default fp16)")
    p.add_argument("--rank", type=int, help="without --base: re-factor the merged LoRA to this rank by SVD "
                   "(default: concatenate ranks, exact)")
    p.add_argument("--conv-rank", type=int, help="with --rank: rank of 3x3 conv modules (default: --rank)")
    p.add_argument("--family", help="without --base: model family of the files (default: detected)")
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"),
                   help="without --base: default the inputs' dtype (fp32 if they differ); with --format "
                        "single-file: default fp16")
    p.add_argument("--lenient", action="store_true", help="skip (and count) keys that fit no module")
    p.add_argument("--out", required=True, help="output folder (with --base) or .safetensors file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="the main job on the embedded base: train a subject LoRA, sample before/after")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo recipe's)")
    p.add_argument("--eval-seeds", type=int, default=8, help="seeds per prompt for the subject/prior checks (0 = skip)")
    p.add_argument("--no-prior", action="store_true",
                   help="train without prior preservation (no class images): a plain subject LoRA")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("world", help="write toy-world images and captions, or the personalization sets")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-n", type=int, help="number of images (files 00000.png + 00000.txt ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("pretrain", "heldout"), default="pretrain",
                   help="pretrain: everything but the held-out pairs; heldout: only them")
    p.add_argument("--personalization", action="store_true",
                   help="write the sks_star, outline_style and pink datasets under --out instead")
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("pretrain-tiny", help="pretrain the embedded tiny base from scratch on the toy world")
    p.add_argument("--out", default="runs/pretrain-tiny", help="work folder (checkpoints; rerun to resume)")
    p.add_argument("--steps", type=int, default=3800,
                   help="UNet + text encoder steps (about 2.0 s each on 2 cores, 1.7 s with --processes 2)")
    p.add_argument("--vae-steps", type=int, default=2000, help="VAE steps (first stage, about 0.95 s each)")
    p.add_argument("--latent-factor", type=int, choices=(4, 2), default=4,
                   help="pixels per latent cell: 4 = the shipped base's 16x16 latents; 2 = 32x32 latents (a VAE "
                        "with one downsampling fewer and a UNet with one more stage, about 1.2x the time per "
                        "UNet step), which keep the small sks star's white centre")
    p.add_argument("--snr-shift", type=float, default=0.0, metavar="S",
                   help="divide the noise schedule's signal-to-noise ratio by S; 0 (default) = by the ratio of "
                        "latent cells to the 16x16 base's: 1 for --latent-factor 4, 4 for 2 (a 32x32 UNet "
                        "otherwise takes the object's position from the noise, not the prompt)")
    p.add_argument("--init-from", default="", metavar="BASE",
                   help="start the UNet and text encoder from this tiny base (tiny = the embedded one, or a folder "
                        "pretrain-tiny wrote) instead of random weights: every tensor with a same-shaped "
                        "counterpart is copied (a factor-4 base's stages are a factor-2 UNet's inner ones)")
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="optional third stage: fine-tune the VAE decoder alone on the frozen encoder's latents, "
                        "half of them world geometry in free colours (the UNet stays valid); 0 skips it. "
                        "The shipped base skips it: see its model card")
    p.add_argument("--fg-weight", type=float, default=4.0, metavar="W",
                   help="UNet loss weight 1 + W on latent pixels under the object (the background dominates a "
                        "plain MSE); 0 = plain MSE")
    p.add_argument("--color-drop", type=float, default=0.2, metavar="P",
                   help="leave the colour word out of this share of captions, so that class prompts without a "
                        "colour ('a star on a blue background') work; 0 = WORLD.md's captions only")
    p.add_argument("--vae-augment", type=float, default=0.5, metavar="P",
                   help="share of each VAE batch drawn as world geometry in free colours with nested shapes, so "
                        "the codec keeps what personalization adds (a small white centre, an off-palette "
                        "colour); 0 = world scenes only")
    p.add_argument("--vae-fg-weight", type=float, default=4.0, metavar="W",
                   help="VAE reconstruction weight 1 + W on object pixels (small objects' detail); 0 = plain mean")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=0.0, metavar="MIN",
                   help="pause (with a checkpoint) after MIN minutes; rerun to continue")
    p.add_argument("--share-cpu", action="store_true", help="use one thread while other processes run")
    p.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                   help="data-parallel processes on this machine (one thread each on CPU), each training "
                        "1/N of every batch; the result is the same training up to float rounding")
    p.add_argument("--eval-n", type=int, default=200, help="prompts judged for the model card")
    p.add_argument("--scene-limit", type=int, default=0, metavar="N",
                   help="train on only N of the world's distinct scenes (smoke tests); 0 = all")
    p.add_argument("--install", action="store_true", help="install the result as the embedded tiny base")
    p.set_defaults(func=cmd_pretrain_tiny)

    p = sub.add_parser("eval", help="generate toy-world images and judge them from pixels (WORLD.md)")
    p.add_argument("--base", default="tiny", help="'tiny' or a local diffusers folder")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="LoRA file and scale (repeatable)")
    p.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding (repeatable); with --mode color pass its token as --token")
    p.add_argument("--mode", required=True, choices=("base", "heldout", "subject", "prior", "style", "color"),
                   help="what to measure; prior with --lora runs without and with the LoRA")
    p.add_argument("-n", type=int, default=200, help="images for base / heldout")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt (or per shape) for the other modes")
    p.add_argument("--seed", type=int, default=0, help="first seed; scene choices are seeded with it too")
    _add_sampling_options(p, batch_size=8)
    p.add_argument("--token", default="<pink>", help="the colour token, for --mode color")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print a JSON document (every image's judgement)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # tuner train --processes N runs it again
    try:
        return int(args.func(args) or 0)
    except TunerError as exc:
        rank = os.environ.get("RANK", "0")  # a data-parallel worker: say which one
        print(f"error{f' (process {rank})' if rank != '0' else ''}: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
