"""The bad-input corpus: every kind of broken or awkward input a user feeds in gives a clear message or a
reported skip, never a traceback. All files are built here, in tmp_path.

Images that can be used (CMYK, 16-bit, palette, grayscale, RGBA, EXIF-rotated) are converted and train;
images that cannot (truncated, not an image, 1x1, decompression-bomb sized) are skipped, named with the
reason and counted in the dataset summary (errors with ``data.strict``). Captions, safetensors files,
checkpoints and recipes that are broken stop the command with exit status 2 and one message naming the file.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner import cli
from tuner.config.schema import Recipe
from tuner.data.dataset import TrainDataset
from tuner.data.folder import scan_dataset
from tuner.errors import DataError, FormatError, TunerError
from tuner.formats.io import read_safetensors, save_safetensors
from tuner.train.checkpoint import load_checkpoint

# ------------------------------------------------------------------------------------------ the corpus

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def png_claiming(path: Path, width: int, height: int) -> None:
    """A valid PNG header that declares ``width x height`` pixels (and holds none): a decompression bomb's
    first bytes, which is all PIL needs to refuse it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


def make_usable(folder: Path) -> None:
    """Images of awkward but valid kinds, each with a caption."""
    Image.new("RGB", (64, 64), RED).save(folder / "plain.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # red in CMYK
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(folder / "gray16.png")
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    palette.save(folder / "palette.png")
    Image.new("L", (64, 64), 90).save(folder / "gray.png")
    rgba = Image.new("RGBA", (64, 64), (*RED, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half fully transparent
    rgba.save(folder / "rgba.png")
    photo = Image.new("RGB", (96, 64), (255, 255, 255))
    photo.paste(BLUE, (0, 0, 24, 24))  # stored top-left blue; EXIF 6 shows it at the top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(folder / "exif_rotated.jpg", quality=95, exif=exif)
    for path in folder.iterdir():
        path.with_suffix(".txt").write_text(f"a {path.stem} picture", encoding="utf-8")


BROKEN = {  # file name -> (how to make it, what the skip reason says)
    "truncated.png": (lambda p: (noise((64, 64)).save(p), cut_in_half(p)), "truncated"),
    "truncated.jpg": (lambda p: (noise((64, 64)).save(p, quality=90), cut_in_half(p)), "truncated"),
    "text.png": (lambda p: p.write_text("this is a text file, not a picture"), "not an image"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "not an image"),
    "one_pixel.png": (lambda p: Image.new("RGB", (1, 1), RED).save(p), "too small (1x1 px"),
    "bomb.png": (lambda p: png_claiming(p, 30000, 30000), "too large (decompression-bomb guard"),
}


def make_broken(folder: Path) -> None:
    for name, (make, _) in BROKEN.items():
        make(folder / name)
        (folder / name).with_suffix(".txt").write_text("a broken picture", encoding="utf-8")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    make_usable(folder)
    make_broken(folder)
    return folder


# ------------------------------------------------------------------------------------------ images


def test_broken_images_are_skipped_named_and_counted(corpus: Path):
    index = scan_dataset(corpus)
    skipped = {path.name: reason for path, reason in index.skipped}
    assert set(skipped) == set(BROKEN)
    for name, (_, reason) in BROKEN.items():
        assert reason in skipped[name], (name, skipped[name])
    assert sorted(item.path.name for item in index.items) == [
        "cmyk.jpg", "exif_rotated.jpg", "gray.png", "gray16.png", "palette.png", "plain.png", "rgba.png"]
    summary = index.summary(resolution=64)
    assert "7 images in 1 folder(s)" in summary and f"{len(BROKEN)} file(s) skipped" in summary


def test_strict_mode_lists_every_broken_image_in_one_error(corpus: Path):
    with pytest.raises(DataError) as err:
        scan_dataset(corpus, strict=True)
    message = str(err.value)
    assert f"{len(BROKEN)} problem(s)" in message and "strict mode" in message
    assert all(str(corpus / name) in message for name in BROKEN)


def pixels_of(dataset: TrainDataset, name: str) -> np.ndarray:
    """The training pixels of one image as uint8 HWC."""
    k = next(i for i, item in enumerate(dataset.index.items) if item.path.name == name)
    tensor = dataset.deterministic_example(k, flipped=False)
    return ((tensor.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def close(a, b, tol: int = 12) -> bool:
    return bool(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= tol)


def test_awkward_images_train_as_upright_rgb(corpus: Path):
    index = scan_dataset(corpus)
    by_name = {item.path.name: item for item in index.items}
    assert by_name["exif_rotated.jpg"].size == (64, 96)  # upright: the 96x64 file shows portrait
    data = TrainDataset(index, resolution=64, background=(0, 0, 255))
    assert close(pixels_of(data, "cmyk.jpg")[32, 32], (255, 0, 0), tol=10)
    assert close(pixels_of(data, "gray16.png")[32, 32], [round(40000 / 257)] * 3, tol=1)  # scaled, not clipped
    assert close(pixels_of(data, "palette.png")[32, 32], GREEN, tol=1)
    assert close(pixels_of(data, "gray.png")[32, 32], (90, 90, 90), tol=1)
    rgba = pixels_of(data, "rgba.png")
    assert close(rgba[32, 8], (0, 0, 255), tol=1) and close(rgba[32, 56], RED, tol=1)
    rotated = pixels_of(data, "exif_rotated.jpg")  # centre crop of the 64x96 portrait: rows 16..79
    assert close(rotated[1, 60], BLUE, tol=40) and close(rotated[1, 4], (255, 255, 255), tol=40)


def test_a_run_on_the_corpus_trains_and_logs_the_summary(corpus: Path, tmp_path: Path):
    from conftest import small_recipe

    from tuner.train.loop import train
    from tuner.train.setup import setup_run

    lines: list[str] = []
    run = setup_run(small_recipe(corpus, tmp_path / "out", train__steps=1, train__batch_size=7,
                                 data__alpha_background=[0, 0, 0]), log=lines.append)
    assert run.dataset.background == (0, 0, 0)
    assert sum(line.startswith("skipped ") for line in lines) == len(BROKEN)
    assert any(f"{len(BROKEN)} file(s) skipped" in line for line in lines)
    result = train(run, log=lines.append)
    assert result.steps == 1 and np.isfinite(result.final_loss)


def test_alpha_background_comes_from_the_recipe(corpus: Path, tmp_path: Path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[data]\nalpha_background = [0, 0, 255, 9]\n", encoding="utf-8")
    assert cli.main(["validate", str(recipe), "--data", str(corpus), "--output", str(tmp_path / "o")]) == 2
    out = capsys.readouterr().out
    assert "data.alpha_background = [0, 0, 255, 9]: expected 3 integers in 0..255" in out

    from tuner.train.setup import background

    r = Recipe()
    r.data.alpha_background = [0, 0, 255]
    assert background(r) == (0, 0, 255)


def test_validate_reports_the_skips_without_a_traceback(corpus: Path, tmp_path: Path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nbatch_size = 1\n", encoding="utf-8")
    code = cli.main(["validate", str(recipe), "--data", str(corpus), "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    for name, (_, reason) in BROKEN.items():
        assert f"will skip {corpus / name}: " in captured.out and reason in captured.out
    assert f"7 images in 1 folder(s), 7 samples per epoch; {len(BROKEN)} file(s) skipped" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_a_folder_of_only_broken_images_is_one_clear_error(tmp_path: Path):
    folder = tmp_path / "broken"
    folder.mkdir()
    make_broken(folder)
    with pytest.raises(DataError, match=rf"no usable image in dataset folder {folder}.*{len(BROKEN)} unreadable"):
        scan_dataset(folder)


# ------------------------------------------------------------------------------------------ captions


def test_a_caption_in_invalid_utf8_names_the_file_and_byte(tmp_path: Path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), RED).save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"a caf\xe9 picture")  # Latin-1 e-acute
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\npath = "{folder}"\n[output]\ndir = "{tmp_path / "out"}"\n', encoding="utf-8")
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'a.txt'}: caption is not valid UTF-8 (byte offset 5" in err
    assert "re-save the file with UTF-8 encoding" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ safetensors


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def good_file(path: Path) -> Path:
    save_safetensors(path, {"lora_unet_x.lora_down.weight": torch.ones(4, 8)}, {"ss_network_dim": "4"})
    return path


BAD_SAFETENSORS = {  # name -> (bytes maker, what the message says)
    "truncated.safetensors": (lambda p: good_file(p).write_bytes(p.read_bytes()[:-40]), "the file is truncated"),
    "header_cut.safetensors": (lambda p: good_file(p).write_bytes(p.read_bytes()[:30]), "larger than"),
    "garbage.safetensors": (lambda p: p.write_bytes(b"\x13" * 100), "larger than"),
    "tiny.safetensors": (lambda p: p.write_bytes(b"abc"), "shorter than the 8-byte header length"),
    "not_json.safetensors": (lambda p: p.write_bytes(struct.pack("<Q", 6) + b"{oops}"), "not valid JSON"),
    "lies_about_shape.safetensors": (
        lambda p: p.write_bytes(safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, bytes(32))),
        "span 32 bytes but F32 x [4, 4] needs 64"),
    "lies_about_size.safetensors": (
        lambda p: p.write_bytes(safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}, bytes(64))),
        "lies outside the file"),
    "negative_shape.safetensors": (
        lambda p: p.write_bytes(safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, bytes(16))),
        "invalid shape"),
    "bad_dtype.safetensors": (
        lambda p: p.write_bytes(safetensors_bytes(
            {"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))),
        "unsupported dtype"),
}


@pytest.mark.parametrize("name", sorted(BAD_SAFETENSORS))
def test_corrupt_safetensors_are_refused_by_path(tmp_path: Path, name: str, capsys):
    make, says = BAD_SAFETENSORS[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(FormatError) as err:
        read_safetensors(path)
    assert str(err.value).startswith(str(path)) and says in str(err.value), str(err.value)
    assert cli.main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"error: {path}" in captured.err and "Traceback" not in captured.err


def test_sampling_with_a_corrupt_lora_is_one_message(tmp_path: Path, capsys):
    path = tmp_path / "cut.safetensors"
    BAD_SAFETENSORS["truncated.safetensors"][0](path)
    code = cli.main(["sample", "--lora", str(path), "--prompt", "a red circle", "--steps", "1",
                     "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {path}" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_a_damaged_checkpoint_is_refused_with_its_path(tmp_path: Path):
    from tuner.train.checkpoint import CheckpointState, save_checkpoint

    state = CheckpointState(step=2, trainable={"unet.w": torch.ones(3)}, optimizer={}, lr_scheduler={},
                            history={"loss": [1.0]}, recipe_toml="")
    folder = save_checkpoint(tmp_path, state)
    assert load_checkpoint(folder).step == 2
    (folder / "state.pt").write_bytes(b"PK\x03\x04 not a torch file")
    with pytest.raises(TunerError, match=rf"cannot read checkpoint state '{folder / 'state.pt'}'"):
        load_checkpoint(folder)
    cut_in_half(folder / "trainable.safetensors")
    with pytest.raises(FormatError, match=str(folder / "trainable.safetensors")):
        load_checkpoint(folder)


# ------------------------------------------------------------------------------------------ recipes


def test_a_recipe_with_wrong_types_lists_every_problem(tmp_path: Path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(
        '[train]\nsteps = "ten"\nbatch_size = 2.5\n[adapter]\nrank = "8"\n[data]\nflip = "yes"\n'
        '[optim]\nbetas = 0.9\nlearning_rat = 1e-4\n', encoding="utf-8")
    for command in ("validate", "train"):
        code = cli.main([command, str(recipe)])
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert code == 2 and "6 problem(s) in the recipe" in text, text
        for key in ("train.steps = 'ten'", "train.batch_size = 2.5", "adapter.rank = '8'", "data.flip = 'yes'",
                    "optim.betas = 0.9", "optim.learning_rat"):
            assert key in text, (key, text)
        assert "did you mean" in text.lower() and "Traceback" not in text


def test_a_recipe_that_is_not_toml_names_the_line(tmp_path: Path, capsys):
    recipe = tmp_path / "broken.toml"
    recipe.write_text("[train]\nsteps = = 3\n", encoding="utf-8")
    assert cli.main(["validate", str(recipe)]) == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert str(recipe) in text and "line 2" in text and "Traceback" not in text
