"""Tests of the data layer: image loading, captions, folder scanning, the deterministic dataset.

Images are built with PIL on the fly in tmp_path; nothing touches the network.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.data.captions import process_caption, read_caption, split_tags, tag_frequency
from tuner.data.dataset import Example, TrainDataset, collate
from tuner.data.folder import DataItem, DatasetIndex, scan_dataset
from tuner.data.images import ImageLoadError, load_image, prepare_image
from tuner.errors import DataError, TunerError

# ----------------------------------------------------------------------------------------------- helpers


def write_image(path: Path, size: tuple[int, int] = (16, 16), color=(200, 40, 40), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def truncated(path: Path, fmt: str) -> Path:
    noise_image((64, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares a huge size but holds no pixels (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def three_band_image() -> Image.Image:
    """40x20: left quarter red, middle half green, right quarter blue (asymmetric top/bottom too)."""
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 10, 20))
    img.paste((0, 0, 255), (30, 0, 40, 20))
    img.paste((255, 255, 255), (10, 0, 30, 2))
    return img


def single_item_index(path: Path, caption: str = "a photo", repeats: int = 1) -> DatasetIndex:
    return DatasetIndex(root=path.parent, items=[DataItem(path, caption, repeats, "x")])


# ------------------------------------------------------------------------------------------ image loading


def test_modes_load_as_rgb(tmp_path: Path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = np.asarray(load_image(tmp_path / "cmyk.jpg"))[4, 4].astype(int)
    assert np.abs(out - [255, 0, 0]).max() <= 8

    # 16-bit grayscale is scaled to 8 bits, not clipped (PIL's own conversion turns 32896 into 255).
    gray = np.array([[0, 32896], [65535, 2570]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB"
    assert np.asarray(img)[:, :, 0].tolist() == [[0, 128], [255, 10]]
    assert np.asarray(img)[0, 1].tolist() == [128, 128, 128]

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "pal.bmp")
    pal.save(tmp_path / "pal_t.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "pal.bmp"))[1, 1].tolist() == [10, 20, 30]
    out = np.asarray(load_image(tmp_path / "pal_t.png", background=(0, 255, 0)))
    assert out[0, 0].tolist() == [0, 255, 0] and out[1, 1].tolist() == [10, 20, 30]

    la = Image.new("LA", (4, 4), (100, 255))
    la.putpixel((0, 0), (100, 0))
    la.save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png", background=(0, 0, 255)))
    assert out[0, 0].tolist() == [0, 0, 255] and out[1, 1].tolist() == [100, 100, 100]

    write_image(tmp_path / "rgba.png", (4, 4), (200, 0, 0, 128), mode="RGBA")
    for background, expected in [((0, 0, 255), [100, 0, 127]), ((255, 255, 255), [227, 127, 127])]:
        out = np.asarray(load_image(tmp_path / "rgba.png", background=background))[2, 2].astype(int)
        assert np.abs(out - expected).max() <= 1, (background, out)

    write_image(tmp_path / "bw.bmp", (4, 4), 1, mode="1")
    assert np.asarray(load_image(tmp_path / "bw.bmp"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path: Path):
    img = Image.new("RGB", (20, 10), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 5, 5))  # stored top-left corner marked red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored top-left shows at the top-right
    img.save(tmp_path / "rot.jpg", quality=95, exif=exif)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (10, 20)
    pixels = np.asarray(out).astype(int)
    assert np.abs(pixels[1, 8] - [255, 0, 0]).max() < 40  # top-right is now red
    assert np.abs(pixels[1, 1] - [255, 255, 255]).max() < 40  # top-left is white


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("text.png", lambda p: p.write_text("not an image"), "not an image"),
        ("cut.png", lambda p: truncated(p, "PNG"), "truncated"),
        ("cut.jpg", lambda p: truncated(p, "JPEG"), "truncated"),
        ("bomb.png", lambda p: png_header_only(p, 20000, 20000), "too large"),
        ("near_bomb.png", lambda p: png_header_only(p, 10000, 10000), "too large"),  # PIL only warns
        ("missing.png", lambda p: None, "not found"),
    ],
)
def test_unreadable_images_raise_data_error(tmp_path: Path, name, make, reason):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert isinstance(info.value, DataError) and isinstance(info.value, TunerError)
    assert str(path) in str(info.value) and reason in info.value.reason
    assert info.value.path == path


# ------------------------------------------------------------------------------------------ prepare_image


def test_resize_and_center_crop():
    out = prepare_image(three_band_image(), 16, crop="center")
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # 40x20 -> 32x16, centre crop = columns 8..24: the green band (top rows white), no red or blue.
    assert torch.allclose(out[:, 8, 8], torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)
    assert torch.allclose(out[:, 0, 8], torch.tensor([1.0, 1.0, 1.0]), atol=0.2)
    assert out[0, 4:, :].max() < -0.8 and out[2, 4:, :].max() < -0.8
    tall = prepare_image(three_band_image().rotate(90, expand=True), 16)
    assert tall.shape == (3, 16, 16)


def test_flip_really_flips():
    img = three_band_image()
    plain = prepare_image(img, 16, crop="center", flip=False)
    flipped = prepare_image(img, 16, crop="center", flip=True)
    assert not torch.equal(plain, flipped)
    assert torch.equal(flipped, plain.flip(-1))
    wide = prepare_image(img, 20, crop="center")  # 40x20 -> no resize, crop columns 10..30
    assert torch.equal(prepare_image(img, 20, flip=True), wide.flip(-1))


def test_random_crop_needs_generator_and_is_seeded():
    img = noise_image((64, 16))
    with pytest.raises(ValueError, match="Generator"):
        prepare_image(img, 16, crop="random")
    crops = [prepare_image(img, 16, "random", generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert len({c.sum().item() for c in crops}) > 1
    again = prepare_image(img, 16, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, crops[3])


# ----------------------------------------------------------------------------------------------- captions


def test_read_caption_normalizes_and_rejects_invalid_utf8(tmp_path: Path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeff  a  photo\n of   sks, dög \n".encode())
    assert read_caption(good) == "a photo of sks, dög"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xffdef")
    with pytest.raises(DataError, match=r"bad\.txt.*not valid UTF-8.*byte offset 3"):
        read_caption(bad)
    bad.write_bytes(b"\xef\xbb\xbfab\xfe")
    with pytest.raises(DataError, match="byte offset 5"):
        read_caption(bad)


def test_caption_dropout_rate_is_right_and_exact():
    dropped = sum(
        process_caption("sks dog", dropout=0.25, generator=torch.Generator().manual_seed(k)) == ""
        for k in range(4000)
    )
    assert abs(dropped - 1000) < 4 * math.sqrt(4000 * 0.25 * 0.75)
    assert dropped == 1012  # golden: fixed seeds must always drop the same captions
    g = torch.Generator().manual_seed(0)
    assert process_caption("sks dog", dropout=0.0, generator=g) == "sks dog"
    assert process_caption("sks dog", dropout=1.0, generator=g) == ""
    with pytest.raises(ValueError):
        process_caption("x", dropout=1.5, generator=g)


def test_shuffle_keeps_first_tags():
    caption = "sks, dog, a, b, c, d, e, f"
    seen = set()
    for seed in range(30):
        out = process_caption(
            caption, shuffle_tags=True, keep_tags=2, generator=torch.Generator().manual_seed(seed)
        )
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags[2:]) == ["a", "b", "c", "d", "e", "f"]
        seen.add(out)
    assert len(seen) > 5
    firsts = {
        process_caption(caption, shuffle_tags=True, generator=torch.Generator().manual_seed(s)).split(", ")[0]
        for s in range(30)
    }
    assert len(firsts) > 1  # keep_tags=0 moves the first tag too
    unshuffled = process_caption("b,a,  c", shuffle_tags=False, generator=torch.Generator())
    assert unshuffled == "b,a,  c"


def test_tag_frequency():
    assert split_tags(" a, ,b ,") == ["a", "b"]
    assert tag_frequency(["Sks, dog", "sks, Cat,", "DOG , sks"]) == {"sks": 3, "dog": 2, "cat": 1}
    assert tag_frequency([]) == {}


# ------------------------------------------------------------------------------------------ folder scanning


def test_txt_captions_and_extensions(tmp_path: Path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a photo\n\n of  sks ", encoding="utf-8")
    write_image(tmp_path / "b.JPG")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    write_image(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    write_image(tmp_path / ".hidden.png")
    index = scan_dataset(tmp_path)
    assert [(i.path.name, i.caption, i.caption_source) for i in index.items] == [
        ("a.png", "a photo of sks", "txt"),
        ("b.JPG", "second", "txt"),
        ("c.webp", "third", "txt"),
    ]
    assert index.skipped == [] and index.num_images == 3


@pytest.mark.parametrize("column", ["text", "caption", "prompt"])
def test_metadata_jsonl_captions(tmp_path: Path, column: str):
    for name in ["a.png", "b.png", "c.png", "3_sub/d.png"]:
        write_image(tmp_path / name)
    (tmp_path / "b.txt").write_text("from txt", encoding="utf-8")
    rows = [
        {"file_name": "a.png", column: "red  cube"},
        {"file_name": "b.png", column: "ignored: the .txt wins"},
        {"file_name": "3_sub/d.png", column: "in a subfolder"},
        {"file_name": "gone.png", column: "no such file"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    write_image(tmp_path / "plain" / "e.png")  # a subfolder's own metadata.jsonl
    (tmp_path / "plain" / "metadata.jsonl").write_text(json.dumps({"file_name": "e.png", column: "own"}))
    index = scan_dataset(tmp_path, instance_prompt="sks")
    got = {i.path.name: (i.caption, i.caption_source) for i in index.items}
    assert got == {
        "a.png": ("red cube", "metadata"),
        "b.png": ("from txt", "txt"),
        "c.png": ("sks", "instance_prompt"),
        "d.png": ("in a subfolder", "metadata"),
        "e.png": ("own", "metadata"),
    }


def test_metadata_column_priority_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*args, **kwargs):
        raise AssertionError("reading metadata.jsonl must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    write_image(tmp_path / "a.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "prompt": "p", "text": "t", "caption": "c"}) + "\n")
    assert scan_dataset(tmp_path).items[0].caption == "t"
    meta.write_text(json.dumps({"file_name": "a.png", "description": "d"}) + "\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl: no caption column"):
        scan_dataset(tmp_path, instance_prompt="x")
    meta.write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl: cannot read metadata"):
        scan_dataset(tmp_path, instance_prompt="x")


def test_instance_prompt_fallback_and_missing_caption(tmp_path: Path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    index = scan_dataset(tmp_path, instance_prompt="  photo of  sks dog ")
    assert [i.caption for i in index.items] == ["photo of sks dog"] * 2
    assert {i.caption_source for i in index.items} == {"instance_prompt"}
    (tmp_path / "a.txt").write_text("own caption")
    with pytest.raises(DataError, match="no caption and no instance_prompt") as info:
        scan_dataset(tmp_path)
    assert str(tmp_path / "b.png") in str(info.value) and "a.png" not in str(info.value)


def test_repeat_folders_and_summaries(tmp_path: Path):
    root = tmp_path / "data"
    for name in ["r1.png", "r2.png"]:
        write_image(root / name)
        (root / name).with_suffix(".txt").write_text("root, style")
    for name in ["s1.png", "s2.png", "s3.png"]:
        write_image(root / "10_sks" / name)
        (root / "10_sks" / name).with_suffix(".txt").write_text(
            "sks, dog" if name != "s3.png" else "sks, cat"
        )
    write_image(root / "other" / "o1.png")
    (root / "other" / "o1.txt").write_text("Other")
    write_image(root / "10_sks" / "deeper" / "ignored.png")
    index = scan_dataset(root, default_repeats=2)
    assert [i.path.name for i in index.items] == ["r1.png", "r2.png", "s1.png", "s2.png", "s3.png", "o1.png"]
    assert [i.repeats for i in index.items] == [2, 2, 10, 10, 10, 2]
    assert index.num_images == 6
    assert index.samples_per_epoch == 2 * 2 + 3 * 10 + 2
    assert index.ignored_dirs == [root / "10_sks" / "deeper"]
    assert index.folder_summary() == {
        "data": {"n_repeats": 2, "img_count": 2},
        "10_sks": {"n_repeats": 10, "img_count": 3},
        "other": {"n_repeats": 2, "img_count": 1},
    }
    assert index.tag_frequency_by_folder() == {
        "data": {"root": 2, "style": 2},
        "10_sks": {"sks": 3, "dog": 2, "cat": 1},
        "other": {"other": 1},
    }
    dataset = TrainDataset(index, resolution=8)
    assert len(dataset) == 36
    counts = np.bincount([dataset.item_of(i) for i in range(len(dataset))])
    assert counts.tolist() == [2, 2, 10, 10, 10, 2]
    assert scan_dataset(root, default_repeats=2).items == index.items  # deterministic
    write_image(root / "0_off" / "z.png")
    with pytest.raises(DataError, match="0_off"):
        scan_dataset(root)


def test_unreadable_images_skipped_or_strict(tmp_path: Path):
    write_image(tmp_path / "good.png")
    (tmp_path / "fake.png").write_text("this is text")
    truncated(tmp_path / "cut.png", "PNG")
    truncated(tmp_path / "cut.jpg", "JPEG")
    index = scan_dataset(tmp_path, instance_prompt="sks")
    assert [i.path.name for i in index.items] == ["good.png"]
    skipped = dict(index.skipped)
    assert set(skipped) == {tmp_path / "fake.png", tmp_path / "cut.png", tmp_path / "cut.jpg"}
    assert "not an image" in skipped[tmp_path / "fake.png"]
    assert "truncated" in skipped[tmp_path / "cut.png"] and "truncated" in skipped[tmp_path / "cut.jpg"]
    with pytest.raises(DataError) as info:
        scan_dataset(tmp_path, instance_prompt="sks", strict=True)
    message = str(info.value)
    assert message.startswith("3 problem(s)")
    for name in ["fake.png", "cut.png", "cut.jpg"]:
        assert str(tmp_path / name) in message
    assert "good.png" not in message


def test_empty_and_missing_folders(tmp_path: Path):
    with pytest.raises(DataError, match=r"no usable image.*\*\.png") as info:
        scan_dataset(tmp_path, instance_prompt="x")
    assert str(tmp_path) in str(info.value)
    (tmp_path / "fake.jpg").write_text("text")
    with pytest.raises(DataError, match=r"no usable image(.|\n)*fake\.jpg"):
        scan_dataset(tmp_path, instance_prompt="x")
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        scan_dataset(missing)
    assert str(missing) in str(info.value)


def test_invalid_utf8_caption_fails_scan(tmp_path: Path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")  # latin-1
    with pytest.raises(DataError, match=r"a\.txt.*not valid UTF-8.*byte offset 3"):
        scan_dataset(tmp_path, instance_prompt="x")


# -------------------------------------------------------------------------------------------- the dataset


def test_examples_reproducible_for_same_seed_epoch_index(tmp_path: Path):
    path = tmp_path / "noise.png"
    noise_image((48, 16)).save(path)
    index = single_item_index(path, "sks, a, b, c, d", repeats=20)

    def make(seed: int) -> TrainDataset:
        return TrainDataset(
            index,
            resolution=16,
            center_crop=False,
            flip=True,
            caption_dropout=0.2,
            shuffle_tags=True,
            keep_tags=1,
            seed=seed,
        )

    first, fresh, other = make(0), make(0), make(1)
    first.set_epoch(3)
    a = [first[i] for i in range(20)]
    fresh.set_epoch(3)
    for i in reversed(range(20)):  # a different access order must not matter (resume mid-epoch)
        b = fresh[i]
        assert torch.equal(a[i].pixel_values, b.pixel_values)
        assert (a[i].caption, a[i].flipped, a[i].item_index) == (b.caption, b.flipped, b.item_index)
    assert torch.equal(first.get(7, 3).pixel_values, a[7].pixel_values)
    assert len({x.pixel_values.sum().item() for x in a}) > 3  # random crops vary per sample
    assert any(x.flipped for x in a) and not all(x.flipped for x in a)
    other.set_epoch(3)
    assert any(not torch.equal(other[i].pixel_values, a[i].pixel_values) for i in range(20))
    assert any(first.get(i, 4).caption != a[i].caption for i in range(20))
    for x in a:
        assert x.pixel_values.shape == (3, 16, 16) and -1 <= x.pixel_values.min() <= x.pixel_values.max() <= 1


def test_center_crop_flip_matches_deterministic_example(tmp_path: Path):
    path = tmp_path / "bands.png"
    three_band_image().save(path)
    dataset = TrainDataset(single_item_index(path, repeats=16), resolution=16, flip=True, seed=5)
    examples = [dataset[i] for i in range(16)]
    assert {x.flipped for x in examples} == {True, False}
    for x in examples:
        assert torch.equal(x.pixel_values, dataset.deterministic_example(0, x.flipped))
    assert torch.equal(
        dataset.deterministic_example(0, True), dataset.deterministic_example(0, False).flip(-1)
    )
    assert torch.equal(dataset.deterministic_example(0, False), prepare_image(load_image(path), 16))


def test_dataset_caption_dropout(tmp_path: Path):
    path = write_image(tmp_path / "a.png", (8, 8))
    dataset = TrainDataset(
        single_item_index(path, "sks dog", repeats=2000), resolution=8, caption_dropout=0.1
    )
    dropped = sum(dataset[i].caption == "" for i in range(len(dataset)))
    assert abs(dropped - 200) < 4 * math.sqrt(2000 * 0.1 * 0.9)
    assert dropped == 181  # golden for seed 0, epoch 0
    kept = {dataset[i].caption for i in range(50)} - {""}
    assert kept == {"sks dog"}


def test_epoch_order(tmp_path: Path):
    path = write_image(tmp_path / "a.png", (8, 8))
    dataset = TrainDataset(single_item_index(path, repeats=50), resolution=8, seed=1)
    orders = [dataset.epoch_order(e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(50))
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] != list(range(50))
    assert TrainDataset(single_item_index(path, repeats=50), resolution=8, seed=1).epoch_order(1) == orders[1]
    assert TrainDataset(single_item_index(path, repeats=50), resolution=8, seed=2).epoch_order(1) != orders[1]


def test_collate(tmp_path: Path):
    path = write_image(tmp_path / "a.png", (8, 8))
    dataset = TrainDataset(single_item_index(path, "c", repeats=3), resolution=8, flip=True)
    examples = [dataset[i] for i in range(3)]
    batch = collate(examples)
    assert batch.pixel_values.shape == (3, 3, 8, 8) and batch.pixel_values.dtype == torch.float32
    assert batch.captions == ["c"] * 3 and batch.item_indices == [0, 0, 0]
    assert batch.flipped == [x.flipped for x in examples] and len(batch) == 3
    assert torch.equal(batch.pixel_values[1], examples[1].pixel_values)
    assert isinstance(examples[0], Example)
    with pytest.raises(ValueError):
        collate([])
