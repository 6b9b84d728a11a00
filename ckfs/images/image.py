"""Reading an image out of the content store: its tree, manifest and config.

These answer the questions every consumer asks of an image name — which
manifest fits this machine, what are its diff IDs, how big is it — from
local content only, never the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckfs import mediatypes as mt
from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import Digest
from ckfs.errors import NotFound
from ckfs.images import manifest as manifests
from ckfs.images import platforms
from ckfs.images.config import ImageConfig, parse_config

__all__ = ["config", "manifest", "platforms_of", "read_config", "size", "tree"]

#: Configs are JSON but may carry long histories; still bounded.
MAX_CONFIG_SIZE = 16 << 20


def _read(content: ContentStore, desc: Descriptor) -> manifests.Index | manifests.Manifest:
    data = content.read_all(desc.digest, limit=manifests.MAX_MANIFEST_SIZE)
    return manifests.parse(desc, data)


def tree(
    content: ContentStore,
    target: Descriptor,
    *,
    name: str = "",
    missing_layers: list[Descriptor] | None = None,
) -> list[Descriptor]:
    """Every present blob under *target*, parents before children.

    An index may lack some platforms (a pull takes only the host's); a
    manifest's config and layers are required, except that with
    *missing_layers* a missing layer is appended there instead (a lazily
    pulled image has only its layers' indexes).

    Raises:
        NotFound: the target, or a config or layer of a present manifest, is
            missing.
    """
    out: list[Descriptor] = []
    seen: set[Digest] = set()
    todo = [(target, True)]
    while todo:
        desc, required = todo.pop()
        if desc.digest in seen:
            continue
        if not content.exists(desc.digest):
            if missing_layers is not None and mt.is_layer(desc.media_type):
                missing_layers.append(desc)
                continue
            if required:
                raise NotFound(
                    f"image {name or target.digest}: blob {desc.digest} ({desc.media_type}) "
                    "is missing"
                )
            continue
        seen.add(desc.digest)
        out.append(desc)
        if mt.is_index(desc.media_type) or mt.is_manifest(desc.media_type):
            parsed = _read(content, desc)
            if isinstance(parsed, manifests.Index):
                todo.extend((c, False) for c in reversed(parsed.manifests))
            else:
                todo.extend((c, True) for c in reversed([parsed.config, *parsed.layers]))
    return out


def size(content: ContentStore, target: Descriptor) -> int:
    """Bytes of all present content under *target* (what ``images ls`` shows)."""
    return sum(d.size for d in tree(content, target))


def manifest(
    content: ContentStore, target: Descriptor, platform: Platform | None = None
) -> tuple[Descriptor, manifests.Manifest]:
    """The manifest of *target* for *platform* (default: this host).

    Raises:
        NotFound: no present manifest matches the platform.
    """
    want = platform or platforms.default()
    todo: Sequence[Descriptor] = [target]
    while todo:
        desc = todo[0]
        parsed = _read(content, desc)
        if isinstance(parsed, manifests.Manifest):
            return desc, parsed
        candidates = [
            d for d in platforms.select(parsed.manifests, want) if content.exists(d.digest)
        ]
        if not candidates:
            raise NotFound(f"image {target.digest}: no manifest for platform {want}")
        todo = candidates
    raise NotFound(f"image {target.digest}: no manifest")  # pragma: no cover


def config(
    content: ContentStore, target: Descriptor, platform: Platform | None = None
) -> ImageConfig:
    """The parsed image config of *target* for *platform* (default: this host)."""
    return read_config(content, manifest(content, target, platform)[1])


def read_config(content: ContentStore, m: manifests.Manifest) -> ImageConfig:
    """The parsed config *m* names, for callers that hold the manifest already."""
    data = content.read_all(m.config.digest, limit=MAX_CONFIG_SIZE)
    return parse_config(data, where=f"config {m.config.digest}")


def platforms_of(content: ContentStore, target: Descriptor) -> list[Platform]:
    """The platforms *target* offers: from an index's entries, or a manifest's config."""
    if mt.is_index(target.media_type):
        parsed = _read(content, target)
        assert isinstance(parsed, manifests.Index)
        return [d.platform for d in parsed.manifests if d.platform is not None]
    try:
        cfg = config(content, target)
    except NotFound:
        return []
    return [cfg.platform()]
