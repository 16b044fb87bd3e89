"""Small helpers shared by the format modules (error listings, JSON-valued metadata)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

MAX_LISTED = 20


def listing(headline: str, items: list[str], limit: int = MAX_LISTED) -> str:
    """``headline:`` then up to ``limit`` items, one a line, and how many more were left out."""
    lines = [headline + ":"] + [f"  - {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def decode_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Metadata with JSON-looking values (starting with ``{`` or ``[``) decoded, as A1111 shows them.

    A value that looks like JSON but does not parse is kept as the string.
    """
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, str) and value[:1] in ("{", "["):
            try:
                decoded[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        decoded[key] = value
    return decoded
