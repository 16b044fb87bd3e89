"""safetensors files: atomic writes, and reads that check the file before trusting it.

Layout of a safetensors file: 8 bytes little-endian ``N``, then ``N`` bytes of JSON header (an object
mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional
``"__metadata__"`` object of strings), then the tensor data; offsets are relative to the start of the data.

Every problem with a file we are asked to read is a :class:`~tuner.errors.FormatError` that names the
path; nothing here unpickles anything.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from tuner.errors import FormatError, TunerError

# Bytes per element of each safetensors dtype we can read (sub-byte float types are not supported).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

# safetensors itself refuses headers above 100 MB; a larger claim means a corrupt or foreign file.
MAX_HEADER_BYTES = 100_000_000

TensorInfo = tuple[str, tuple[int, ...]]
"""``(safetensors dtype string, shape)`` of one tensor, as the header states it."""


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""``output.save_dtype`` / ``--save-dtype`` names -> torch dtypes."""

def prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors that own their memory, ready for ``safetensors.torch.save``.

    A tensor that is a view into a larger buffer, or that shares memory with another entry, is copied:
    safetensors refuses shared storage, and a view would otherwise drag its whole buffer along.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__} {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().to("cpu")
        storage = t.untyped_storage()
        owns_all = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.nbytes
        if not owns_all or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A plain ``dict[str, str]`` copy of ``metadata``; ``TypeError`` naming the first non-string."""
    result: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"safetensors metadata must map str to str; {key!r} -> {type(value).__name__} {value!r}"
                " (convert numbers and booleans with str(), nested data with json.dumps)"
            )
        result[key] = value
    return result


def save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and then renamed over
    ``path``: readers see either the previous file or the complete new one. If anything fails, the
    temporary file is removed and an existing file at ``path`` is left untouched. Metadata values must be
    ``str`` (``TypeError`` before anything is written).
    """
    meta = check_metadata(metadata)
    write_bytes_atomic(path, save(prepare_tensors(tensors), metadata=meta or None))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, flushed, fsynced and
    renamed over ``path``. On failure the temporary file is removed and an existing ``path`` is untouched;
    an error of the operating system (disk full, read-only, permission) is a :class:`WriteError`."""
    with open_atomic(path) as fh:
        _write_all(fh, data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def open_atomic(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file handle whose contents appear at ``path`` only if the block completes.

    For writers that want a file object (``PIL.Image.save``, ``torch.save``). The handle writes to a hidden
    temporary file beside ``path`` (``.NAME.PID.RANDOM.tmp``); after the block it is flushed, fsynced and
    renamed over ``path``, and the folder is fsynced. If the block raises, or the disk fills, the
    temporary file is removed and a previous file at ``path`` stays as it was. ``OSError`` from the
    operating system comes out as :class:`WriteError` (a :class:`~tuner.errors.TunerError` and an
    ``OSError``) naming ``path`` and the reason.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError.from_os_error(target, exc) from exc
    fsync_dir(target.parent)


class WriteError(TunerError, OSError):
    """The operating system refused a write (disk full, read-only folder, no permission). Nothing was left
    under the final name; the message says which file and what to do. ``errno`` and ``filename`` are set as
    on the ``OSError`` it replaces."""

    def __str__(self) -> str:  # OSError's own would show "[Errno N] ..." instead of our message
        return str(self.args[0]) if self.args else ""

    @classmethod
    def from_os_error(cls, path: Path, exc: OSError) -> WriteError:
        reason = exc.strerror or str(exc) or type(exc).__name__
        err = cls(
            f"cannot write '{path}': {reason}{f' (errno {exc.errno})' if exc.errno else ''}; nothing was written "
            f"under that name and a previous file there is unchanged. {cls.hint(exc.errno)}."
        )
        err.errno = exc.errno
        err.filename = str(path)
        return err

    @staticmethod
    def hint(code: int | None) -> str:
        """What to do about a failed write with this errno (a sentence without its full stop)."""
        return _WRITE_HINTS.get(code or 0, "Check the folder and try again")


_WRITE_HINTS = {
    errno.ENOSPC: "Free some disk space (or choose another output folder) and try again",
    errno.EDQUOT: "Your disk quota is full: free some space and try again",
    errno.EROFS: "The file system is read-only: choose another output folder",
    errno.EACCES: "You may not write there: choose another output folder or fix its permissions",
    errno.EPERM: "You may not write there: choose another output folder or fix its permissions",
}


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``folder`` (for folders written by other libraries, e.g.
    diffusers' ``save_pretrained``, before they are renamed into place)."""
    root = Path(folder)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def writable_folder_problem(path: str | os.PathLike[str]) -> str | None:
    """None if ``path`` is a folder we can write into, or could be created as one; else the reason.

    Nothing is created: the nearest existing folder on the way is probed with an anonymous temporary file
    (permission bits alone do not tell, e.g. for root or on a read-only mount).
    """
    target = Path(path)
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            return f"none of the folders above '{target}' exists"
        probe = probe.parent
    if not probe.is_dir():
        return f"'{probe}' is a file, so '{target}' cannot be a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"'{probe}' is not writable ({exc.strerror or exc})"
    return None


def _write_all(fh: BinaryIO, data: bytes, chunk: int = 1 << 24) -> None:
    """Write in chunks (one huge write can fail on some platforms)."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        fh.write(view[start : start + chunk])


def fsync_dir(folder: Path) -> None:
    """Make the rename durable where the OS allows it (POSIX); harmless to skip elsewhere."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """``(metadata, {name: (dtype, shape)})`` of a safetensors file, read without loading tensor data.

    The whole header is validated against the file size first (see :func:`_parse_header`); any problem is
    a :class:`FormatError` naming ``path``.
    """
    metadata, entries, _ = _parse_header(Path(path))
    return metadata, {name: (dtype, shape) for name, (dtype, shape, _) in entries.items()}


def data_offset(path: str | os.PathLike[str]) -> int:
    """Byte offset where the tensor data of a (validated) safetensors file begins: ``8 + header length``."""
    return _parse_header(Path(path))[2]


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, after validating its header and offsets."""
    p = Path(path)
    metadata, _, _ = _parse_header(p)
    try:
        tensors = load_file(p)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise FormatError(f"{p}: cannot read the tensors of this safetensors file: {exc}") from None
    return tensors, metadata


def read_tensors(path: str | os.PathLike[str], names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors of a safetensors file (lazy read; used for alphas when inspecting)."""
    p = Path(path)
    _parse_header(p)
    try:
        with safe_open(p, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise FormatError(f"{p}: cannot read tensors of this safetensors file: {exc}") from None


def _parse_header(
    p: Path,
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], tuple[int, int]]], int]:
    """Validate ``p`` as a safetensors file: ``(metadata, {name: (dtype, shape, (begin, end))}, data start)``.

    Checks, each a :class:`FormatError` naming the path: the file exists and is a file; it holds at least
    the 8-byte length; the header fits in the file; the header is a UTF-8 JSON object starting with ``{``
    (A1111 refuses anything else); metadata is strings only; each entry has a known dtype, a shape of
    non-negative ints and offsets whose span is exactly ``dtype size x number of elements``; the tensors
    tile the data block without gaps or overlaps and end exactly at the end of the file.
    """
    if not p.exists():
        raise FormatError(f"{p}: file not found")
    if not p.is_file():
        raise FormatError(f"{p}: not a file")
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise FormatError(
                    f"{p}: not a safetensors file: {size} bytes, shorter than the 8-byte header length"
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{p}: not a safetensors file (or truncated): header length {header_len} is larger than "
                    f"the {size - 8} bytes that follow it"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise FormatError(f"{p}: cannot read file: {exc}") from None
    if not raw.startswith(b"{"):
        raise FormatError(f"{p}: not a safetensors file: the header does not start with '{{'")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{p}: not a safetensors file: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: not a safetensors file: the header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{p}: invalid safetensors metadata: '__metadata__' must map strings to strings")

    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
    for name, entry in header.items():
        entries[name] = _check_entry(p, name, entry, data_len)
    position = 0
    for name, (_, _, (begin, end)) in sorted(entries.items(), key=lambda item: item[1][2]):
        if begin != position:
            problem = (
                "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            )
            raise FormatError(
                f"{p}: corrupt safetensors file: tensor {name!r} at data offset {begin} {problem}"
            )
        position = end
    if position != data_len:
        raise FormatError(
            f"{p}: corrupt safetensors file: tensors cover {position} bytes of data but the file has {data_len}"
        )
    return metadata, entries, data_start


def _check_entry(
    p: Path, name: str, entry: object, data_len: int
) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    where = f"{p}: corrupt safetensors header: tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{where} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise FormatError(
            f"{where} lies outside the file: data_offsets {offsets} but only {data_len} data bytes (the file "
            "is truncated, e.g. by an interrupted download or copy, or its header is wrong)"
        )
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise FormatError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but {dtype} x {shape} needs {expected}"
        )
    return dtype, tuple(shape), (begin, end)
