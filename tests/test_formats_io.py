"""safetensors I/O: atomic writes and validation of corrupt files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import tuner.formats.io as fio
from tuner.errors import FormatError
from tuner.formats.io import read_header, read_safetensors, save_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}


def test_round_trip_with_views_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "row": base[1], "same": base, "alpha": torch.tensor(3.0)}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors, {"k": "v"})
    back, meta = read_safetensors(path)
    assert meta == {"k": "v"}
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor)
    assert back["alpha"].shape == ()
    meta2, infos = read_header(path)
    assert meta2 == {"k": "v"} and infos["t"] == ("F32", (4, 3)) and infos["alpha"] == ("F32", ())


def test_non_string_metadata_is_rejected_before_writing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_safetensors(path, _tensors(), {"ss_network_dim": 4})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def _fail_half_way(fh, data: bytes, chunk: int = 1 << 24) -> None:
    fh.write(data[: len(data) // 2])
    raise OSError("disk full")


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "lora.safetensors"
    save_safetensors(path, _tensors(), {"version": "old"})
    before = path.read_bytes()
    if where == "write":
        monkeypatch.setattr(fio, "_write_all", _fail_half_way)
    else:

        def boom(*args, **kwargs):
            raise OSError(f"{where} failed")

        monkeypatch.setattr(os, where, boom)
    with pytest.raises(OSError):
        save_safetensors(path, {"c": torch.zeros(1000)}, {"version": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # temp file removed
    assert read_safetensors(path)[1] == {"version": "old"}


def _valid_bytes() -> bytes:
    return save(_tensors(), {"k": "v"})


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _header_and_data(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _corrupt(case: str) -> bytes:
    blob = _valid_bytes()
    header, data = _header_and_data(blob)
    if case == "short":
        return b"\x01\x02\x03"
    if case == "header_too_long":
        return struct.pack("<Q", len(blob) * 10) + blob[8:]
    if case == "not_json":
        raw = b"{this is not json}"
        return struct.pack("<Q", len(raw)) + raw + data
    if case == "not_brace":
        raw = b'["a", 1]'
        return struct.pack("<Q", len(raw)) + raw + data
    if case == "outside":
        header["b"]["data_offsets"] = [24, 10_000]
        return _with_header(header, data)
    if case == "overlap":  # a third tensor reusing the tail of "a"; the data is still covered end to end
        header["c"] = {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}
        return _with_header(header, data)
    if case == "size_lie":
        header["a"]["shape"] = [3, 3]
        return _with_header(header, data)
    if case == "gap":
        return _with_header(header, data + b"\x00" * 4)
    if case == "dtype":
        header["a"]["dtype"] = "F3"
        return _with_header(header, data)
    if case == "metadata":
        header["__metadata__"] = {"k": 1}
        return _with_header(header, data)
    if case == "truncated":
        return blob[:-3]
    raise AssertionError(case)


CASES = ["short", "header_too_long", "not_json", "not_brace", "outside", "overlap", "size_lie", "gap", "dtype",
         "metadata", "truncated"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_corrupt_files_give_format_error_naming_the_path(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_corrupt(case))
    for reader in (read_header, read_safetensors):
        with pytest.raises(FormatError) as err:
            reader(path)
        assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FormatError, match="not found") as err:
        read_safetensors(path)
    assert str(path) in str(err.value)


def test_corruption_cases_really_are_the_only_difference(tmp_path):
    # the unmodified construction reads fine, so each corrupt case above fails for its own reason
    path = tmp_path / "ok.safetensors"
    header, data = _header_and_data(_valid_bytes())
    path.write_bytes(_with_header(header, data))
    tensors, meta = read_safetensors(path)
    assert meta == {"k": "v"} and torch.equal(tensors["a"], _tensors()["a"])


def test_empty_file_and_directory(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="shorter than"):
        read_header(empty)
    with pytest.raises(FormatError, match="not a file"):
        read_header(Path(tmp_path))
