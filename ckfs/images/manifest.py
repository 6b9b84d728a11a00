"""Image indexes and manifests: parsing what a registry sends, writing our own.

Everything a registry or an archive hands us is hostile until checked:
`parse` refuses oversized bodies, bodies whose declared media type disagrees
with the descriptor that led to them (a registry must not be able to turn a
manifest into an index behind our back), Docker schema 1 (unsigned, no
content addressing of the config, deprecated since 2017) and children with
malformed descriptors. What comes out are frozen `Index` and `Manifest`
values whose descriptors are already validated.

`children` is containerd's ``images.Children``: the edges of the content
graph, used to fetch an image recursively and to label blobs for gc.
`index_json` and `manifest_json` write canonical JSON for the manifests ckfs
synthesizes itself (``docker save`` imports, OCI layout export), so the same
inputs always give the same bytes and therefore the same digest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.errors import InvalidArgument
from ckfs.jsondoc import parse_object
from ckfs.labels import GC_REF_CONTENT

__all__ = [
    "MAX_MANIFEST_SIZE",
    "Index",
    "Manifest",
    "body_media_type",
    "canonical_json",
    "children",
    "gc_labels",
    "index_json",
    "manifest_json",
    "parse",
]

#: Largest manifest or index ckfs reads (4 MiB, containerd's limit): a hostile
#: registry cannot exhaust memory by serving an endless "manifest". Real ones
#: are a few KiB; even a large multi-platform index stays far below.
MAX_MANIFEST_SIZE = 4 << 20

#: What every refusal of a Docker schema 1 manifest says after naming it.
SCHEMA1_HINT = (
    "Docker schema 1 manifests are not supported; re-push the image with a current client"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Index:
    """An OCI image index or Docker manifest list: one entry per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """An OCI or Docker image manifest: one config plus layers, bottom first.

    ``artifact_type`` is non-empty for OCI artifacts: the body's
    ``artifactType``, or else a config media type that is not an image
    config (the image-spec's rule). Such a manifest is not a container image;
    `is_image` says so.
    """

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str = ""

    @property
    def is_image(self) -> bool:
        """Whether this describes a container image (its config is an image config)."""
        return not self.artifact_type and mt.is_config(self.config.media_type)


def parse(desc: Descriptor, data: bytes) -> Index | Manifest:
    """Parse and validate the index or manifest *data* that *desc* points at.

    The body's ``mediaType`` must equal ``desc.media_type``; an OCI body may
    omit it, and then its shape (``manifests`` vs ``config``/``layers``) must
    agree with the descriptor. Layer media types must be ones ckfs can
    unpack. The digest of *data* is not checked here: the content store
    verified it when the bytes came in.

    Args:
        desc: the descriptor the bytes were fetched by.
        data: the raw body.

    Raises:
        InvalidArgument: the body is larger than `MAX_MANIFEST_SIZE`, not JSON,
            not schema version 2, Docker schema 1, of an unknown media type or
            one that contradicts *desc*, or holds an invalid descriptor or an
            unknown layer media type. Messages start with
            ``manifest <digest>:``.
    """
    return _parse(desc, data, check_layers=True)


def children(desc: Descriptor, data: bytes) -> list[Descriptor]:
    """The descriptors *desc* refers to (containerd ``images.Children``).

    An index yields its manifests; a manifest its config then its layers,
    bottom first; anything else (config, layer, unknown blob) yields nothing.
    Layer media types are not checked here, so that walking an index that
    also carries attestations or other artifacts does not fail.

    Args:
        desc: the descriptor of *data*.
        data: the blob's bytes (ignored unless *desc* is an index or manifest).

    Raises:
        InvalidArgument: *desc* is an index, a manifest or Docker schema 1
            and *data* fails the checks of `parse`.
    """
    if desc.media_type in mt.SCHEMA1:
        raise InvalidArgument(f"manifest {desc.digest}: {SCHEMA1_HINT}")
    if not (mt.is_index(desc.media_type) or mt.is_manifest(desc.media_type)):
        return []
    parsed = _parse(desc, data, check_layers=False)
    if isinstance(parsed, Index):
        return list(parsed.manifests)
    return [parsed.config, *parsed.layers]


def gc_labels(desc: Descriptor, data: bytes) -> dict[str, str]:
    """containerd's GC reference labels from a manifest or index to its children.

    They let ``ckfs gc`` (and containerd) walk from image roots to every blob
    without parsing JSON. Index children are ``.m.<i>``; a manifest's config
    is ``.config`` and its layers ``.l.<i>``; any other blob has none. Import
    and pull both label what they commit, so the labels live beside
    `children`, whose leniency they share: an attestation manifest with
    non-layer blobs is labelled too.

    Raises:
        InvalidArgument: as `children`.
    """
    kids = children(desc, data)
    if mt.is_index(desc.media_type):
        return {f"{GC_REF_CONTENT}.m.{i}": str(d.digest) for i, d in enumerate(kids)}
    if not kids:
        return {}
    labels = {f"{GC_REF_CONTENT}.config": str(kids[0].digest)}
    labels.update({f"{GC_REF_CONTENT}.l.{i}": str(d.digest) for i, d in enumerate(kids[1:])})
    return labels


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no insignificant whitespace, UTF-8.

    Same inputs, same bytes, same digest: re-exporting an image never
    produces a "new" manifest.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def index_json(
    manifests: Sequence[Descriptor],
    annotations: Mapping[str, str] | None = None,
    *,
    media_type: str = mt.OCI_INDEX,
) -> bytes:
    """Canonical JSON for an index listing *manifests*.

    Args:
        manifests: the entries, typically with ``platform`` set.
        annotations: index-level annotations (OCI only).
        media_type: `mediatypes.OCI_INDEX` or `mediatypes.DOCKER_MANIFEST_LIST`.

    Raises:
        InvalidArgument: *media_type* is not an index type, or annotations
            were given for a Docker manifest list (it has no such field).
    """
    if not mt.is_index(media_type):
        raise InvalidArgument(f"index: unknown media type {media_type!r}")
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [d.to_json() for d in manifests],
    }
    if annotations:
        if media_type == mt.DOCKER_MANIFEST_LIST:
            raise InvalidArgument("index: Docker manifest lists have no annotations")
        body["annotations"] = dict(annotations)
    return canonical_json(body)


def manifest_json(
    config: Descriptor,
    layers: Sequence[Descriptor],
    media_type: str = mt.OCI_MANIFEST,
    *,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Canonical JSON for an image manifest of *config* and *layers*.

    Args:
        config: the image config's descriptor.
        layers: layer descriptors, bottom first.
        media_type: `mediatypes.OCI_MANIFEST` or `mediatypes.DOCKER_MANIFEST`.
        annotations: manifest-level annotations (OCI only).

    Raises:
        InvalidArgument: *media_type* is not a manifest type, a layer media
            type is unknown, or annotations were given for a Docker manifest.
    """
    if not mt.is_manifest(media_type):
        raise InvalidArgument(f"manifest: unknown media type {media_type!r}")
    for i, layer in enumerate(layers):
        if not mt.is_layer(layer.media_type):
            raise InvalidArgument(
                f"manifest: layers[{i}]: unknown layer media type {layer.media_type!r}"
            )
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    if annotations:
        if media_type == mt.DOCKER_MANIFEST:
            raise InvalidArgument("manifest: Docker image manifests have no annotations")
        body["annotations"] = dict(annotations)
    return canonical_json(body)


def body_media_type(body: Mapping[str, Any], where: str) -> str | None:
    """An index's or manifest's media type from its decoded body, as a registry derives it.

    The body's own ``mediaType`` if it names an index or a manifest; else, as
    OCI bodies may omit it, their shape (``manifests`` or ``config``); None
    when the body is neither.

    Raises:
        InvalidArgument: a Docker schema 1 manifest (``<where>: ...``).
    """
    declared = body.get("mediaType")
    version = body.get("schemaVersion")
    if declared in mt.SCHEMA1 or "fsLayers" in body or (type(version) is int and version == 1):
        raise InvalidArgument(f"{where}: {SCHEMA1_HINT}")
    if isinstance(declared, str) and (mt.is_index(declared) or mt.is_manifest(declared)):
        return declared
    if declared is None and "manifests" in body:
        return mt.OCI_INDEX
    if declared is None and "config" in body:
        return mt.OCI_MANIFEST
    return None


# -- parsing ------------------------------------------------------------------


def _parse(desc: Descriptor, data: bytes, *, check_layers: bool) -> Index | Manifest:
    where = f"manifest {desc.digest}"
    if desc.media_type in mt.SCHEMA1:
        raise InvalidArgument(f"{where}: {SCHEMA1_HINT}")
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidArgument(
            f"{where}: {len(data)} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit"
        )
    body = parse_object(data, where)

    version = body.get("schemaVersion")
    if "fsLayers" in body or (type(version) is int and version == 1):
        raise InvalidArgument(f"{where}: {SCHEMA1_HINT}")
    if type(version) is not int or version != 2:  # not True (== 1) nor 2.0
        raise InvalidArgument(f"{where}: schemaVersion must be 2, got {version!r}")

    media_type = _media_type(desc, body, where)
    annotations = _annotations(body.get("annotations"), f"{where}: annotations")
    if mt.is_index(media_type):
        entries = body.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"{where}: manifests must be a list")
        return Index(
            media_type=media_type,
            manifests=tuple(
                Descriptor.from_json(d, where=f"{where}: manifests[{i}]")
                for i, d in enumerate(entries)
            ),
            annotations=annotations,
        )

    config = Descriptor.from_json(body.get("config"), where=f"{where}: config")
    raw_layers = body.get("layers")
    if raw_layers is None:
        raw_layers = []
    if not isinstance(raw_layers, list):
        raise InvalidArgument(f"{where}: layers must be a list")
    layers = tuple(
        Descriptor.from_json(d, where=f"{where}: layers[{i}]") for i, d in enumerate(raw_layers)
    )
    artifact_type = body.get("artifactType") or ""
    if not isinstance(artifact_type, str):
        raise InvalidArgument(f"{where}: artifactType must be a string")
    if not artifact_type and not mt.is_config(config.media_type):
        # image-spec: without artifactType, an artifact is typed by its config.
        artifact_type = config.media_type
    if check_layers:
        for i, layer in enumerate(layers):
            if not mt.is_layer(layer.media_type):
                what = (
                    f" (artifact type {artifact_type}, not a container image)"
                    if artifact_type
                    else ""
                )
                raise InvalidArgument(
                    f"{where}: layers[{i}]: unknown layer media type {layer.media_type!r}{what}"
                )
    subject = body.get("subject")
    return Manifest(
        media_type=media_type,
        config=config,
        layers=layers,
        annotations=annotations,
        subject=Descriptor.from_json(subject, where=f"{where}: subject")
        if subject is not None
        else None,
        artifact_type=artifact_type,
    )


def _media_type(desc: Descriptor, body: Mapping[str, Any], where: str) -> str:
    """Reconcile the body's media type with the descriptor's and its shape."""
    declared = body.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidArgument(f"{where}: mediaType must be a string")
    if declared in mt.SCHEMA1:
        raise InvalidArgument(f"{where}: {SCHEMA1_HINT}")
    if declared and declared != desc.media_type:
        raise InvalidArgument(
            f"{where}: media type mismatch: descriptor says {desc.media_type}, body says {declared}"
        )
    media_type = desc.media_type
    if not (mt.is_index(media_type) or mt.is_manifest(media_type)):
        raise InvalidArgument(f"{where}: unknown media type {media_type!r}")

    looks_like_index = "manifests" in body
    looks_like_manifest = "config" in body or "layers" in body
    if looks_like_index and looks_like_manifest:
        raise InvalidArgument(f"{where}: has both manifests and config/layers")
    if mt.is_index(media_type) and looks_like_manifest:
        raise InvalidArgument(
            f"{where}: media type {media_type} is an index but the body is a manifest"
        )
    if mt.is_manifest(media_type) and looks_like_index:
        raise InvalidArgument(
            f"{where}: media type {media_type} is a manifest but the body is an index"
        )
    return media_type


def _annotations(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument(f"{where}: must map strings to strings")
    return dict(value)
