"""Descriptors and platforms: how one blob points at another.

A `Descriptor` is the OCI content descriptor (media type, digest, size,
annotations, platform, urls). It is immutable and converts to and from the
exact JSON field names of the image spec, so what ckfs stores and exports
round-trips through other tools unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument

__all__ = ["Descriptor", "Platform"]


@dataclasses.dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform: ``os/architecture[/variant]`` plus rarer fields."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @classmethod
    def from_json(cls, data: Any) -> Platform:
        if not isinstance(data, Mapping):
            raise InvalidArgument("platform: expected an object")
        os_, arch = data.get("os"), data.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str):
            raise InvalidArgument("platform: os and architecture must be strings")
        features = data.get("os.features") or []
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise InvalidArgument("platform: os.features must be a list of strings")
        return cls(
            os=os_,
            architecture=arch,
            variant=str(data.get("variant") or ""),
            os_version=str(data.get("os.version") or ""),
            os_features=tuple(features),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    artifact_type: str = ""

    def __hash__(self) -> int:
        return hash((self.media_type, self.digest, self.size))

    @classmethod
    def from_json(cls, data: Any, *, where: str = "descriptor") -> Descriptor:
        """Parse and validate a descriptor object.

        Raises:
            InvalidArgument: a field is missing or of the wrong type, the digest
                is invalid or the size negative; the message starts with *where*.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"{where}: expected an object")
        media_type = data.get("mediaType")
        size = data.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidArgument(f"{where}: missing mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{where}: size must be a non-negative integer")
        try:
            digest = Digest.parse(data.get("digest"))  # type: ignore[arg-type]
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {e}") from None
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise InvalidArgument(f"{where}: annotations must map strings to strings")
        platform = data.get("platform")
        urls = data.get("urls") or ()
        if not isinstance(urls, list | tuple) or not all(isinstance(u, str) for u in urls):
            raise InvalidArgument(f"{where}: urls must be a list of strings")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=dict(annotations),
            platform=Platform.from_json(platform) if platform is not None else None,
            urls=tuple(urls),
            artifact_type=str(data.get("artifactType") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    def replace(self, **changes: Any) -> Descriptor:
        return dataclasses.replace(self, **changes)
