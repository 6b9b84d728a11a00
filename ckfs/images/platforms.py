"""Platforms: which manifest of a multi-platform image this machine runs.

An index names each manifest's platform as its builder spelled it, and
spellings vary (``x86_64``, ``aarch64``, ``arm64/v8``, ``arm`` meaning
``arm/v7``). Everything is compared after `normalize`, which follows
containerd's ``platforms.Normalize`` so that ckfs picks the same manifest
``ctr`` and ``nerdctl`` would.

Matching is strict: same OS, architecture and variant after normalization.
containerd's ``platforms.Only`` additionally falls back to older variants
(``arm/v7`` running ``arm/v6``, ``amd64`` running ``386``); ckfs does not, so
a mount never silently gets a slower or emulated image.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

from ckfs.descriptor import Descriptor, Platform
from ckfs.errors import InvalidArgument

__all__ = ["default", "matches", "normalize", "parse", "select"]

#: The OS ckfs runs on; containerd uses runtime.GOOS. ckfs assembles Linux
#: root filesystems, so this is not probed.
HOST_OS = "linux"

# From Go's syslist, as containerd's platforms database has them: a lone
# specifier is an OS if it is one of these, else it must be a known arch.
_KNOWN_OS = frozenset(
    "aix android darwin dragonfly freebsd hurd illumos ios js linux nacl netbsd "  # noqa: SIM905
    "openbsd plan9 solaris windows zos".split()
)
_KNOWN_ARCH = frozenset(
    "386 amd64 amd64p32 arm armbe arm64 arm64be ppc64 ppc64le loong64 mips mipsle "  # noqa: SIM905
    "mips64 mips64le mips64p32 mips64p32le ppc riscv riscv64 s390 s390x sparc sparc64 "
    "wasm".split()
)
_COMPONENT = re.compile(r"[A-Za-z0-9_.-]+")

#: ``uname -m`` spellings of 32-bit arm (not in containerd's table, which
#: gets them from /proc/cpuinfo instead) → variant.
_UNAME_ARM = {"armv5tel": "v5", "armv5l": "v5", "armv6l": "v6", "armv7l": "v7", "armv8l": "v8"}


def normalize(p: Platform) -> Platform:
    """The canonical spelling of *p*, as containerd's ``platforms.Normalize``.

    OS is lower-cased (empty means this host, ``macos`` is ``darwin``).
    Architectures: ``x86_64``/``x86-64`` → ``amd64`` (variant ``v1`` dropped);
    ``aarch64`` → ``arm64`` with ``v8``/``8``/``v8.0`` dropped and ``9``/``v9.0``
    → ``v9``; ``armhf`` → ``arm/v7``; ``armel`` → ``arm/v6``; ``arm`` defaults
    to ``v7`` and ``5``/``6``/``8`` gain their ``v``; ``i386``/``i686`` →
    ``386``; ``uname`` forms such as ``armv7l`` → ``arm/v7``. Anything else
    (``ppc64le``, ``s390x``, ``riscv64``) is only lower-cased. OS version and
    features are kept.
    """
    os_name = p.os.lower() or HOST_OS
    if os_name == "macos":
        os_name = "darwin"
    arch, variant = p.architecture.lower(), p.variant.lower()
    if arch in ("i386", "i686"):
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch = "amd64"
        if variant == "v1":
            variant = ""
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch in _UNAME_ARM:
        arch, variant = "arm", _UNAME_ARM[arch]
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return dataclasses.replace(p, os=os_name, architecture=arch, variant=variant)


def parse(spec: str) -> Platform:
    """Parse ``os/arch[/variant]``, ``os`` or ``arch`` into a normalized platform.

    A lone known OS (``linux``) takes this host's architecture; a lone known
    architecture (``arm64``) takes this host's OS.

    Args:
        spec: e.g. ``linux/amd64``, ``linux/arm64/v8``, ``amd64``, ``linux``.
            Two components are always ``os/arch``: write ``linux/arm/v6``,
            not ``arm/v6``.

    Raises:
        InvalidArgument: empty, wildcards, more than three components, a
            component outside ``[A-Za-z0-9_.-]``, or a lone word that is
            neither a known OS nor a known architecture.
    """
    if "*" in spec:
        raise InvalidArgument(f"invalid platform {spec!r}: wildcards are not supported")
    parts = spec.split("/")
    if len(parts) > 3:
        raise InvalidArgument(f"invalid platform {spec!r}: expected os/arch[/variant]")
    for part in parts:
        if not _COMPONENT.fullmatch(part):
            raise InvalidArgument(
                f"invalid platform {spec!r}: component {part!r} must match [A-Za-z0-9_.-]+"
            )
    if len(parts) == 1:
        os_name = normalize(Platform(os=parts[0], architecture="")).os
        if os_name in _KNOWN_OS:
            return dataclasses.replace(default(), os=os_name)
        p = normalize(Platform(os=HOST_OS, architecture=parts[0]))
        if p.architecture in _KNOWN_ARCH:
            return p
        raise InvalidArgument(
            f"invalid platform {spec!r}: unknown operating system or architecture"
        )
    variant = parts[2] if len(parts) == 3 else ""
    return normalize(Platform(os=parts[0], architecture=parts[1], variant=variant))


def default() -> Platform:
    """This machine's platform: Linux on the normalized ``uname -m``."""
    return normalize(Platform(os=HOST_OS, architecture=os.uname().machine))


def matches(want: Platform, have: Platform) -> bool:
    """Whether an image for *have* runs where *want* is asked for.

    Both are normalized first, so an empty variant on *have* stands for the
    default (``arm`` is ``arm/v7``; ``arm64`` is ``arm64/v8``). OS features
    *have* requires must all be among *want*'s (containerd's rule). The OS
    version is not compared: it matters only for Windows.
    """
    w, h = normalize(want), normalize(have)
    return (
        w.os == h.os
        and w.architecture == h.architecture
        and w.variant == h.variant
        and set(h.os_features) <= set(w.os_features)
    )


def select(manifests: Sequence[Descriptor], want: Platform) -> list[Descriptor]:
    """The entries of an index that match *want*, best first.

    Entries that spell the variant exactly as the normalized *want* does
    come before those that match only after normalization (for ``arm/v7``,
    an entry saying ``arm/v7`` beats one saying just ``arm``); otherwise the
    index's order is kept. Entries without a platform (attestations, some
    artifacts) are skipped.

    Args:
        manifests: an index's ``manifests``.
        want: the platform asked for (normalized here).
    """
    target = normalize(want)
    found = [d for d in manifests if d.platform is not None and matches(target, d.platform)]

    def rank(d: Descriptor) -> int:
        assert d.platform is not None
        return 0 if d.platform.variant.lower() == target.variant else 1

    return sorted(found, key=rank)
