"""End-to-end tests of the ``tuner`` command as a user runs it.

Every command goes through ``tuner.cli.main([...])`` in-process (the imports are paid once), with stdout
and stderr captured; one test runs the installed ``tuner`` script in a subprocess. Runs are tiny (a few
steps on the embedded base at 64 px) and shared at module scope.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import write_circles
from PIL import Image
from safetensors import safe_open

from tuner import __version__
from tuner.cli import main
from tuner.config.schema import CLI_SHORTCUTS

PROMPT = "a red circle on a blue background"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def tuner(*argv: object) -> Result:
    """Run ``tuner ARGV...`` in-process; returns the exit status and what it printed.

    stdout/stderr are redirected here (not with capsys) so module-scoped fixtures can run commands too.
    An exception other than SystemExit escaping ``main`` is a tuner bug and fails the test as it is.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            rc = exc.code if isinstance(exc.code, int) else 1
    return Result(rc, out.getvalue(), err.getvalue())


def assert_clean_error(result: Result) -> str:
    """Exit status 2, an ``error:`` message on stderr and no traceback; returns stderr."""
    assert result.rc == 2, result.text
    assert "error:" in result.err
    assert "Traceback" not in result.err
    return result.err


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def max_diff(a: Path, b: Path) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def fast_recipe(folder: Path) -> Path:
    """A recipe for the failure and data tests: one step, batch 2, nothing else written."""
    return write_recipe(folder / "fast.toml", "[train]\nsteps = 1\nbatch_size = 2\n")


# ---------------------------------------------------------------------------------------------------------
# tuner train with the convenience options and --set (TOML and YAML recipes)

# Values the options below must override; the un-overridden ones (alpha, name) show the file was read.
TOML_RECIPE = """\
# A test recipe: every overridden value differs from the command line's.
[adapter]
rank = 16
alpha = 4.0

[train]
steps = 50
batch_size = 1

[optim]
learning_rate = 1e-4

[output]
name = "circles_toml"
"""

YAML_RECIPE = """\
# The same job as a YAML recipe.
adapter:
  rank: 16
  alpha: 4.0
train:
  steps: 50
  batch_size: 1
optim:
  learning_rate: 1.0e-4
output:
  name: circles_yaml
"""


def train_options(data: Path, out: Path) -> list[object]:
    return [
        "--base", "tiny", "--data", data, "--output", out, "--steps", "2", "--seed", "1",
        "--resolution", "64", "--batch-size", "2", "--rank", "4", "--checkpoint-every", "1",
        "--set", "optim.learning_rate=0.002", "--set", "preview.every=1",
        "--set", 'preview.prompts=["a red circle"]', "--set", "preview.steps=2",
    ]  # fmt: skip


@dataclass
class TrainedByCli:
    recipe: Path
    out: Path
    name: str
    result: Result


def _train_by_cli(folder: Path, data: Path, kind: str) -> TrainedByCli:
    recipe = write_recipe(folder / f"recipe.{kind}", TOML_RECIPE if kind == "toml" else YAML_RECIPE)
    out = folder / "out"
    result = tuner("train", recipe, *train_options(data, out))
    return TrainedByCli(recipe, out, f"circles_{kind}", result)


@pytest.fixture(scope="module")
def toml_run(circles, tmp_path_factory) -> TrainedByCli:
    return _train_by_cli(tmp_path_factory.mktemp("cli_toml"), circles, "toml")


@pytest.fixture(scope="module")
def yaml_run(circles, tmp_path_factory) -> TrainedByCli:
    return _train_by_cli(tmp_path_factory.mktemp("cli_yaml"), circles, "yaml")


@pytest.mark.parametrize("which", ["toml_run", "yaml_run"])
def test_train_with_options_and_overrides(which, circles, request):
    run: TrainedByCli = request.getfixturevalue(which)
    res = run.result
    assert res.rc == 0, res.text
    lora, resolved = run.out / f"{run.name}.safetensors", run.out / f"{run.name}.toml"
    assert lora.is_file() and resolved.is_file()
    assert f"wrote {lora}" in res.out and f"wrote {resolved}" in res.out
    assert "done: 2 steps" in res.out
    # the step arithmetic: 4 circles, batch 2 (command line, not the file's 1), 2 steps
    assert (
        "step arithmetic: 4 images -> 4 samples per epoch (with repeats); batch 2 x accumulation 1 = "
        "2 samples per step -> 2.00 steps per epoch; 2 steps = 1.00 epochs"
    ) in res.out

    ckpts = run.out / "checkpoints"
    assert (ckpts / "step_000001" / "state.pt").is_file()
    assert (ckpts / "step_000001" / "trainable.safetensors").is_file()
    assert (ckpts / "step_000002" / "state.pt").is_file()
    for step in (1, 2):
        preview = run.out / "previews" / f"step_{step:06d}.png"
        assert preview.is_file()
        assert "a red circle" in Image.open(preview).info["parameters"]

    recipe = tomllib.loads(resolved.read_text(encoding="utf-8"))
    assert recipe["adapter"]["rank"] == 4  # --rank over the file's 16
    assert recipe["adapter"]["alpha"] == 4.0  # from the file
    assert recipe["train"]["steps"] == 2
    assert recipe["train"]["batch_size"] == 2
    assert recipe["train"]["seed"] == 1
    assert recipe["train"]["checkpoint_every"] == 1
    assert recipe["optim"]["learning_rate"] == 0.002  # --set over the file's 1e-4
    assert recipe["preview"]["every"] == 1 and recipe["preview"]["prompts"] == ["a red circle"]
    assert recipe["data"]["resolution"] == 64 and recipe["data"]["path"] == str(circles)
    assert recipe["model"]["base"] == "tiny"

    meta = metadata_of(lora)
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert meta["ss_output_name"] == run.name
    assert float(meta["ss_learning_rate"]) == 0.002
    with safe_open(str(lora), "pt") as fh:
        downs = [k for k in fh.keys() if k.endswith(".lora_down.weight")]
        assert downs and all(k.startswith("lora_unet_") for k in downs)
        assert {fh.get_slice(k).get_shape()[0] for k in downs} == {4}


def test_resume_latest_continues_from_the_newest_checkpoint(toml_run, circles, tmp_path):
    assert toml_run.result.rc == 0, toml_run.result.text
    out = tmp_path / "out"
    shutil.copytree(toml_run.out, out)
    shutil.rmtree(out / "previews")  # previews written now show which steps the resumed run trained
    argv = train_options(circles, out)
    argv[argv.index("--steps") + 1] = "3"
    res = tuner("train", toml_run.recipe, *argv, "--resume", "latest")
    assert res.rc == 0, res.text
    assert re.search(r"resumed from \S*step_000002 at step 2", res.out), res.out
    assert "done: 3 steps" in res.out
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_000003.png"]  # only step 3 ran
    assert (out / "checkpoints" / "step_000003" / "state.pt").is_file()
    meta = metadata_of(out / "circles_toml.safetensors")
    assert meta["ss_steps"] == "3"  # the loss history of steps 1-2 came back from the checkpoint
    assert tomllib.loads((out / "circles_toml.toml").read_text(encoding="utf-8"))["train"]["steps"] == 3



# ---------------------------------------------------------------------------------------------------------
# recipe and path errors: exit 2 with the fix, no traceback, before anything slow


def test_bad_recipe_reports_every_problem_at_once(tmp_path, circles):
    recipe = write_recipe(
        tmp_path / "bad.toml",
        '[train]\nsteps = "ten"\n\n[optim]\nlearning_rat = 0.001\noptimizer = "sgd"\n',
    )
    err = assert_clean_error(tuner("train", recipe, "--data", circles, "--output", tmp_path / "out"))
    assert "3 problem(s)" in err
    problems = [line for line in err.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 3, err
    typo = next(p for p in problems if "learning_rat " in p)
    steps = next(p for p in problems if "train.steps" in p)
    choice = next(p for p in problems if "optim.optimizer" in p)
    for line in (typo, steps, choice):
        assert str(recipe) in line
    assert "unknown key optim.learning_rat = 0.001" in typo and "did you mean optim.learning_rate?" in typo
    assert "'ten'" in steps and "expected int" in steps
    assert "'sgd'" in choice and "'adamw'" in choice and "'adamw8bit'" in choice
    assert not (tmp_path / "out").exists()


def test_hub_id_base_fails_fast_and_says_tuner_never_downloads(tmp_path, circles):
    started = time.monotonic()
    res = tuner("train", fast_recipe(tmp_path), "--base", "some-org/some-model", "--data", circles,
                "--output", tmp_path / "out")
    elapsed = time.monotonic() - started
    err = assert_clean_error(res)
    assert elapsed < 20, f"took {elapsed:.1f} s to refuse a hub id"
    assert "some-org/some-model" in err
    assert "never downloads" in err
    assert "--base DIR" in err and "--base tiny" in err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--base", "/nonexistent/dir", "base model path '/nonexistent/dir' does not exist"),
        ("--data", "/nonexistent", "/nonexistent"),
    ],
)
def test_missing_path_is_named(tmp_path, circles, option, value, expected):
    argv = {"--base": "tiny", "--data": str(circles), option: value}
    res = tuner("train", fast_recipe(tmp_path), *[x for kv in argv.items() for x in kv],
                "--output", tmp_path / "out")
    err = assert_clean_error(res)
    assert expected in err
    if option == "--data":
        assert "does not exist" in err


def test_empty_data_folder_says_no_usable_image(tmp_path):
    empty = tmp_path / "empty data"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image", encoding="utf-8")
    err = assert_clean_error(tuner("train", fast_recipe(tmp_path), "--data", empty, "--output", tmp_path / "out"))
    assert "no usable image" in err and str(empty) in err


# ---------------------------------------------------------------------------------------------------------
# data: unreadable images, metadata.jsonl captions, kohya N_name repeat folders


@pytest.fixture(scope="module")
def messy_data(tmp_path_factory) -> tuple[Path, list[Path]]:
    """3 good images, a text file named x.png and a truncated PNG."""
    folder = write_circles(tmp_path_factory.mktemp("messy"), n=3)
    fake = folder / "x.png"
    fake.write_text("this is not a PNG", encoding="utf-8")
    whole = (folder / "0.png").read_bytes()
    truncated = folder / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    return folder, [fake, truncated]


def test_unreadable_images_are_skipped_and_reported(messy_data, tmp_path):
    folder, bad = messy_data
    res = tuner("train", fast_recipe(tmp_path), "--data", folder, "--output", tmp_path / "out")
    assert res.rc == 0, res.text
    for path in bad:
        assert re.search(rf"skipped {re.escape(str(path))}: \S", res.out), res.out
    assert "step arithmetic: 3 images -> 3 samples per epoch" in res.out
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_strict_refuses_unreadable_images_listing_all_of_them(messy_data, tmp_path):
    folder, bad = messy_data
    res = tuner("train", fast_recipe(tmp_path), "--data", folder, "--output", tmp_path / "out", "--strict")
    err = assert_clean_error(res)
    for path in bad:
        assert str(path) in err
    assert "unreadable" in err
    assert not (tmp_path / "out").exists()


def test_metadata_jsonl_captions_and_repeat_folders(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(data / f"m{i}.png")
        rows.append({"file_name": f"m{i}.png", "text": f"metacaption{i}, plain {colour}"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_circles(data / "3_circle", n=2)
    res = tuner("train", fast_recipe(tmp_path), "--data", data, "--output", tmp_path / "out")
    assert res.rc == 0, res.text
    # 2 root images x 1 + 2 images in 3_circle x 3 = 8 samples
    assert "step arithmetic: 4 images -> 8 samples per epoch (with repeats)" in res.out
    meta = metadata_of(tmp_path / "out" / "lora.safetensors")
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs["3_circle"] == {"n_repeats": 3, "img_count": 2}
    assert dirs["data"] == {"n_repeats": 1, "img_count": 2}
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["data"] == {"metacaption0": 1, "metacaption1": 1, "plain blue": 1, "plain red": 1}


# ---------------------------------------------------------------------------------------------------------
# tuner export-base


def test_export_base_loads_in_diffusers_and_samples_like_tiny(tmp_path):
    out = tmp_path / "tiny_base"
    res = tuner("export-base", "tiny", "--out", out)
    assert res.rc == 0, res.text
    assert str(out) in res.out

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()

    # the folder is a --base for tuner too, and gives the very images of the embedded base
    for base, folder in (("tiny", "from_tiny"), (out, "from_folder")):
        res = tuner("sample", "--base", base, "--prompt", PROMPT, "--steps", "2", "--seed", "5",
                    "--out", tmp_path / folder)
        assert res.rc == 0, res.text
    assert max_diff(tmp_path / "from_tiny" / "sample_5.png", tmp_path / "from_folder" / "sample_5.png") == 0

    err = assert_clean_error(tuner("export-base", "tiny", "--out", out))
    assert str(out) in err and "not empty" in err


# ---------------------------------------------------------------------------------------------------------
# tuner sample with LoRA files (kohya and diffusers/PEFT), merged and unmerged


@dataclass
class Sampled:
    lora: Path
    peft: Path
    dirs: dict[str, Path]
    results: dict[str, Result]


@pytest.fixture(scope="module")
def sampled(trained_run, tmp_path_factory) -> Sampled:
    """The same 2 seeds sampled without a LoRA; with the kohya file at scale 0.5 merged, unmerged, and at
    scale 1; and with the PEFT file at 0.5 (trained_run saves both files in fp32: the same numbers)."""
    run, _ = trained_run
    lora, peft = run.out_dir / "t.safetensors", run.out_dir / "t.peft.safetensors"
    root = tmp_path_factory.mktemp("samples")
    common = ["--prompt", PROMPT, "-n", "2", "--seed", "3", "--steps", "3"]
    variants = {
        "base": [],
        "merged": ["--lora", f"{lora}:0.5"],
        "unmerged": ["--lora", f"{lora}:0.5", "--no-merge"],
        "peft": ["--lora", f"{peft}:0.5"],
        "full": ["--lora", lora],  # no scale: 1
        "batched": ["--lora", f"{lora}:0.5", "--batch-size", "2"],
    }
    dirs = {name: root / name for name in variants}
    results = {}
    for name, extra in variants.items():
        with pytest.MonkeyPatch.context() as mp:
            if "--no-merge" in extra:  # the weights stay as they are: the LoRA runs as separate layers
                mp.setattr("tuner.sample.generate.merge_lora", _merge_forbidden)
            results[name] = tuner("sample", *common, *extra, "--out", dirs[name])
    return Sampled(lora, peft, dirs, results)


def _merge_forbidden(*args, **kwargs):
    raise AssertionError("--no-merge merged a LoRA into the base weights")


def test_sample_writes_pngs_with_a1111_parameters(sampled):
    res = sampled.results["merged"]
    assert res.rc == 0, res.text
    out = sampled.dirs["merged"]
    assert sorted(p.name for p in out.iterdir()) == ["sample_3.png", "sample_4.png", "sample_grid.png"]
    for name in ("sample_3.png", "sample_4.png", "sample_grid.png"):
        assert f"wrote {out / name}" in res.out
    assert Image.open(out / "sample_grid.png").size == (128, 64)
    short_hash = metadata_of(sampled.lora)["sshs_model_hash"][:12]
    assert re.fullmatch(r"[0-9a-f]{12}", short_hash)
    for seed in (3, 4):
        image = Image.open(out / f"sample_{seed}.png")
        assert image.size == (64, 64)
        params = image.info["parameters"]
        first, *_, last = params.splitlines()
        assert first == f"{PROMPT} <lora:t:0.5>"
        for field in ("Steps: 3", "Sampler: DDIM", f"Seed: {seed}", "Size: 64x64", f'Lora hashes: "t: {short_hash}"'):
            assert field in last, params


def test_sample_batch_size_draws_the_same_images(sampled):
    """--batch-size 2 denoises both seeds together: the same files, the same pixels within one level."""
    one, two = sampled.dirs["merged"], sampled.dirs["batched"]
    assert sampled.results["batched"].rc == 0, sampled.results["batched"].text
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for seed in (3, 4):
        a, b = (np.asarray(Image.open(d / f"sample_{seed}.png"), dtype=int) for d in (one, two))
        assert np.abs(a - b).max() <= 1


def test_lora_changes_the_images_and_unmerged_matches_merged(sampled):
    for name in ("base", "unmerged", "full"):
        assert sampled.results[name].rc == 0, sampled.results[name].text
    for seed in (3, 4):
        png = f"sample_{seed}.png"
        # otherwise the comparisons below would hold with the LoRA ignored
        assert max_diff(sampled.dirs["base"] / png, sampled.dirs["merged"] / png) > 20
        assert max_diff(sampled.dirs["full"] / png, sampled.dirs["merged"] / png) > 20  # the scale is used
        assert max_diff(sampled.dirs["merged"] / png, sampled.dirs["unmerged"] / png) <= 2


def test_peft_file_gives_the_kohya_files_images(sampled):
    res = sampled.results["peft"]
    assert res.rc == 0, res.text
    for seed in (3, 4):
        png = f"sample_{seed}.png"
        assert max_diff(sampled.dirs["merged"] / png, sampled.dirs["peft"] / png) <= 2
        assert "<lora:" in Image.open(sampled.dirs["peft"] / png).info["parameters"]


def test_sample_missing_lora_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = assert_clean_error(tuner("sample", "--lora", f"{missing}:0.5", "--prompt", PROMPT, "--steps", "1",
                                   "--out", tmp_path / "out"))
    assert str(missing) in err and "does not exist" in err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--size", "65x64", "65x64"),  # not a multiple of the VAE's 4: was a ValueError traceback
        ("--size", "64x-8", "64x-8"),
        ("--size", "0x64", "0x64"),  # was silently sampled at 64x64
        ("--size", "64by64", "WIDTHxHEIGHT"),
        ("--steps", "0", "--steps 0"),  # was a ZeroDivisionError traceback
        ("-n", "0", "-n 0"),  # was exit 0 with nothing written
        ("--batch-size", "0", "--batch-size"),
    ],
)
def test_sample_bad_option_is_a_clean_error(tmp_path, option, value, expected):
    err = assert_clean_error(tuner("sample", "--prompt", PROMPT, "--steps", "1", option, value,
                                   "--out", tmp_path / "out"))
    assert expected in err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()


# a tiny-base module every preset trains, in kohya and diffusers naming
MODULE_KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
MODULE_PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


@pytest.fixture(scope="module")
def misfit_lora(sampled, tmp_path_factory) -> Path:
    """The trained kohya file with one module's factors swapped for ones 96 wide (the base's are 64)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(sampled.lora))
    rank = tensors[f"{MODULE_KOHYA}.lora_down.weight"].shape[0]
    tensors[f"{MODULE_KOHYA}.lora_down.weight"] = torch.zeros(rank, 96)
    tensors[f"{MODULE_KOHYA}.lora_up.weight"] = torch.zeros(96, rank)
    path = tmp_path_factory.mktemp("misfit") / "misfit.safetensors"
    save_file(tensors, str(path), metadata_of(sampled.lora))
    return path


def test_lora_that_does_not_fit_the_base_is_refused(misfit_lora, tmp_path):
    err = assert_clean_error(tuner("sample", "--lora", misfit_lora, "--prompt", PROMPT, "--steps", "1",
                                   "--out", tmp_path / "out"))
    assert MODULE_PATH in err or MODULE_KOHYA in err
    assert "[96, 96]" in err and "[64, 64]" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# tuner inspect


def test_inspect_text_and_json(sampled, misfit_lora):
    stored = metadata_of(sampled.lora)["sshs_model_hash"]
    res = tuner("inspect", sampled.lora)
    assert res.rc == 0, res.text
    assert re.search(r"format:\s+kohya\b", res.out) and re.search(r"family:\s+tiny\b", res.out)
    assert re.search(r"rank:\s+8\s+alpha:\s+8\.0\b", res.out), res.out
    assert f"sshs_model_hash: {stored} (matches;" in res.out

    res = tuner("inspect", "--json", sampled.lora)
    assert res.rc == 0, res.text
    info = json.loads(res.out)
    assert (info["format"], info["family"], info["rank"], info["alpha"]) == ("kohya", "tiny", 8, 8.0)
    assert info["hashes"]["sshs_model_hash"] == stored and info["hashes"]["matches"] is True

    # the verdict is computed: the misfit file kept the original hash but not the original tensors
    res = tuner("inspect", "--json", misfit_lora)
    assert res.rc == 0, res.text
    assert json.loads(res.out)["hashes"]["matches"] is False


# ---------------------------------------------------------------------------------------------------------
# the installed entry point


def test_installed_tuner_script_version_and_train_help():
    script = Path(sys.executable).with_name("tuner")
    if not script.exists():
        script = Path(shutil.which("tuner") or "tuner")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"tuner {__version__}"

    done = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    options = {"--" + name.replace("_", "-") for name in CLI_SHORTCUTS} | {"--set", "--resume", "--strict"}
    missing = sorted(o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", done.stdout))
    assert not missing, f"tuner train --help lacks {missing}:\n{done.stdout}"
