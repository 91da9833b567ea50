"""Whether a container image reference is pinned: the one predicate of the stack spec and of the
policy pack. Standard library only: the policy pack loads this file by path."""

from __future__ import annotations

import re
from typing import Any

#: Tags that move under a running fleet (and any tag starting with "nightly").
FLOATING_TAGS = frozenset({"latest", "nightly", "main", "master", "dev", "edge", "stable"})
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def image_problem(image: Any) -> str | None:
    """None when `image` names a release tag or a sha256 digest; else why it is not pinned."""
    if not isinstance(image, str) or not image.strip():
        return "no image"
    if "@" in image:
        digest = image.split("@", 1)[1]
        return None if _DIGEST.match(digest) else f"image {image!r} has a malformed digest (want @sha256:<64 hex>)"
    last = image.rsplit("/", 1)[-1]  # "host:5000/img" has a registry port, not a tag
    if ":" not in last:
        return f"image {image!r} has no tag (it means :latest): pin a release tag or a @sha256: digest"
    tag = last.split(":", 1)[1].lower()
    if not tag or tag in FLOATING_TAGS or tag.startswith("nightly"):
        return (f"image {image!r} uses the floating tag {tag!r} (nightly/latest images break silently): "
                "pin a release tag or a @sha256: digest")
    return None


def image_is_pinned(image: str) -> bool:
    return image_problem(image) is None
