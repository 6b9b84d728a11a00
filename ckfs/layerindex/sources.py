"""Which index source a layer gets, told from its descriptor alone.

Kept apart from `ckfs.lazy` and `ckfs.layerindex.estargz` (which load trio):
the CLI names the layers a mount could not serve lazily after every mount,
and that should not cost a short-lived process an event loop's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckfs import mediatypes as mt

if TYPE_CHECKING:
    from ckfs.descriptor import Descriptor

__all__ = ["EAGER", "ESTARGZ", "GZIP", "TAR", "TOC_DIGEST_ANNOTATION", "source_of"]

#: Index sources, as `ckfs.layerindex.model.SOURCES` names them.
ESTARGZ, GZIP, TAR = "estargz", "gzip-index", "tar"

#: What a layer falls back to when nothing indexes it.
EAGER = "eager"

#: The layer descriptor annotation holding the sha256 of the TOC JSON.
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"


def source_of(desc: Descriptor) -> str:
    """The index source *desc* would get, judged by its media type and annotations."""
    if TOC_DIGEST_ANNOTATION in (desc.annotations or {}):
        return ESTARGZ
    compression = mt.LAYERS.get(desc.media_type)
    if compression == "gzip":
        return GZIP
    if compression == "none":
        return TAR
    return EAGER
