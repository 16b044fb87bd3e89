"""Generate tuner's shipped CLIP tokenizer files from open_clip's BPE table.

    pip install open_clip_torch          # only needed to run this script, not by tuner
    python scripts/make_clip_tokenizer.py [PATH/TO/bpe_simple_vocab_16e6.txt.gz]

Writes ``tuner/models/configs/clip_tokenizer/vocab.json.gz`` and ``merges.txt.gz`` in the Hugging Face
``CLIPTokenizer`` layout (``vocab.json``: token -> id; ``merges.txt``: ``#version`` line then one merge per
line). Every Stable Diffusion text encoder (SD1 CLIP ViT-L/14, SD2 OpenCLIP ViT-H, SDXL's two) uses this
same 49408-token vocabulary; only the padding token and the length differ (the per-family
``tokenizer_config.json``).

How the vocabulary is built (the construction OpenAI's CLIP documents in its ``simple_tokenizer.py``): the
file's first line is a header; the next 49152 - 256 - 2 lines are merges ``"a b"`` in rank order; ids are
the 256 byte symbols, the same 256 symbols with the end-of-word marker ``</w>``, one id per merge (the
concatenation, in merge order), then ``<|startoftext|>`` and ``<|endoftext|>``. Licence of the source file:
MIT (OpenAI CLIP, and open_clip which ships it); see ``tuner/models/configs/NOTICE.md``.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tuner" / "models" / "configs" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255 used by byte-level BPE (GPT-2/CLIP): bytes that are
    printable Latin-1 characters stand for themselves, the others get code points from 256 upwards."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the vocabulary as: printable bytes in byte order, then the others in byte order.
    symbols = [table[b] for b in sorted(printable)] + [table[b] for b in range(256) if b not in printable]
    return symbols


def main(source: Path) -> None:
    lines = gzip.open(source, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + N_MERGES]
    if len(merges) != N_MERGES or not all(len(m.split(" ")) == 2 for m in merges):
        raise SystemExit(f"{source}: expected {N_MERGES} merges of two symbols after the header line")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise SystemExit(f"built {len(vocab)} distinct tokens, expected 49408")
    OUT.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same input gives byte-identical files.
    with gzip.GzipFile(OUT / "vocab.json.gz", "wb", mtime=0) as fh:
        fh.write(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    with gzip.GzipFile(OUT / "merges.txt.gz", "wb", mtime=0) as fh:
        fh.write(("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    print(f"wrote {OUT}/vocab.json.gz ({len(vocab)} tokens) and merges.txt.gz ({len(merges)} merges)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        src = Path(sys.argv[1])
    else:
        import open_clip  # type: ignore[import-not-found]

        src = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    main(src)
