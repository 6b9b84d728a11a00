"""The image config: the diff IDs a rootfs is built from, and how to run it.

ckfs needs two things from a config: ``rootfs.diff_ids`` (which name the
snapshot chain, see `ckfs.identity`) and the platform (to check a manifest
is for this machine). It also surfaces the run parameters (entrypoint, env,
working dir, user) so a runc bundle can be written without a second parser.

The config comes from a registry, so every field used is type-checked and a
bad one fails with a message naming *where* it came from; fields ckfs does
not interpret stay available in ``raw`` untouched. OCI and Docker configs
share this layout (the OCI spec adopted Docker's), so one parser serves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ckfs.descriptor import Platform
from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.jsondoc import parse_object

__all__ = ["History", "ImageConfig", "parse_config"]


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """One ``history`` entry: how a layer (or an empty step) was made."""

    created: str = ""
    created_by: str = ""
    empty_layer: bool = False
    comment: str = ""
    author: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config ckfs reads; everything else is in ``raw``.

    ``entrypoint`` and ``cmd`` are None when the config leaves them unset
    (which differs from an explicit empty list when an image is extended).
    Times are the config's RFC 3339 strings, unparsed: they are shown, never
    computed with.
    """

    architecture: str
    os: str
    diff_ids: tuple[Digest, ...]
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()
    history: tuple[History, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exposed_ports: tuple[str, ...] = ()
    stop_signal: str = ""
    created: str = ""
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def platform(self) -> Platform:
        """The platform the config declares, as written (not normalized)."""
        return Platform(
            os=self.os,
            architecture=self.architecture,
            variant=self.variant,
            os_version=self.os_version,
            os_features=self.os_features,
        )


def parse_config(data: bytes, *, where: str) -> ImageConfig:
    """Parse and validate an image config.

    Args:
        data: the config blob.
        where: what to call it in errors, e.g. ``"config sha256:…"``.

    Raises:
        InvalidArgument: not a JSON object, ``rootfs.type`` is not
            ``"layers"``, a diff ID is not a valid digest, or a field ckfs
            reads has the wrong type. The message starts with *where*.
    """
    raw = parse_object(data, where)

    rootfs = raw.get("rootfs")
    if not isinstance(rootfs, dict):
        raise InvalidArgument(f"{where}: rootfs: expected an object")
    if rootfs.get("type") != "layers":
        raise InvalidArgument(f"{where}: rootfs.type must be 'layers', got {rootfs.get('type')!r}")
    raw_ids = rootfs.get("diff_ids")
    if raw_ids is None:
        raw_ids = []
    if not isinstance(raw_ids, list):
        raise InvalidArgument(f"{where}: rootfs.diff_ids must be a list")
    diff_ids = []
    for i, value in enumerate(raw_ids):
        try:
            diff_ids.append(Digest.parse(value))
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: rootfs.diff_ids[{i}]: {e}") from None

    run = raw.get("config")
    if run is None:
        run = {}
    if not isinstance(run, dict):
        raise InvalidArgument(f"{where}: config: expected an object")

    ports = run.get("ExposedPorts")
    if ports is not None and not isinstance(ports, dict):
        raise InvalidArgument(f"{where}: config.ExposedPorts: expected an object")

    return ImageConfig(
        architecture=_str(raw, "architecture", where),
        os=_str(raw, "os", where),
        diff_ids=tuple(diff_ids),
        variant=_str(raw, "variant", where),
        os_version=_str(raw, "os.version", where),
        os_features=_strings(raw, "os.features", where) or (),
        history=_history(raw.get("history"), where),
        entrypoint=_strings(run, "Entrypoint", f"{where}: config"),
        cmd=_strings(run, "Cmd", f"{where}: config"),
        env=_strings(run, "Env", f"{where}: config") or (),
        working_dir=_str(run, "WorkingDir", f"{where}: config"),
        user=_str(run, "User", f"{where}: config"),
        labels=_labels(run.get("Labels"), f"{where}: config.Labels"),
        exposed_ports=tuple(sorted(ports or {})),
        stop_signal=_str(run, "StopSignal", f"{where}: config"),
        created=_str(raw, "created", where),
        raw=raw,
    )


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    """A string field; absent or null reads as ``""``."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: {key} must be a string")
    return value


def _strings(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    """A list of strings; None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where}: {key} must be a list of strings")
    return tuple(value)


def _labels(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument(f"{where}: must map strings to strings")
    return dict(value)


def _history(value: Any, where: str) -> tuple[History, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: history must be a list")
    out = []
    for i, entry in enumerate(value):
        at = f"{where}: history[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{at}: expected an object")
        empty = entry.get("empty_layer")
        if empty is None:
            empty = False
        if not isinstance(empty, bool):
            raise InvalidArgument(f"{at}: empty_layer must be a boolean")
        out.append(
            History(
                created=_str(entry, "created", at),
                created_by=_str(entry, "created_by", at),
                empty_layer=empty,
                comment=_str(entry, "comment", at),
                author=_str(entry, "author", at),
            )
        )
    return tuple(out)
