"""Generate the Python modules of ``ckfs/api/**/*.proto`` with grpcio-tools.

Each ``.proto`` declares one protobuf package and sits where that package
says: the package's components after the first (``containerd`` or ``ckfs``)
are its directory under ``ckfs/api``, so ``containerd.services.content.v1``
lives in ``ckfs/api/services/content/v1`` and imports as
``ckfs.api.services.content.v1.content_pb2``. protoc runs with the
repository as its include root, which makes the generated imports between
packages those same paths. containerd's package names are kept because they
are part of the wire (the gRPC method paths); the Python paths are ckfs's.

The output is committed. The generator pins nothing itself: the ``grpc``
extra pins grpcio-tools and mypy-protobuf, so two runs, or two machines,
write the same bytes, and ``--check`` (run by CI) fails when the committed
modules are stale.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The repository: protoc's include root, so generated imports read ``ckfs.api...``.
ROOT = Path(__file__).resolve().parents[2]
#: Where the protos and their generated modules live, relative to ROOT.
API = Path("ckfs/api")
#: First package components allowed, each dropped to form the directory:
#: containerd's (kept for the wire) and ckfs's own.
ROOT_PACKAGES = ("containerd", "ckfs")
#: What the generator writes for every ``x.proto``.
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)\s*;", re.MULTILINE)


class ProtoError(Exception):
    """A proto file is not where its package says, or protoc failed."""


def package_of(proto: Path) -> str:
    """The ``package`` a proto file declares.

    Raises:
        ProtoError: it declares none.
    """
    found = _PACKAGE.findall(proto.read_text(encoding="utf-8"))
    if len(found) != 1:
        raise ProtoError(f"{proto}: expected one package declaration, found {len(found)}")
    return str(found[0])


def package_dir(package: str) -> Path:
    """The directory, relative to the repository, that holds *package*.

    Raises:
        ProtoError: the package is neither containerd's nor ckfs's.
    """
    first, *rest = package.split(".")
    if first not in ROOT_PACKAGES or not rest:
        raise ProtoError(f"package {package}: must be containerd.<...> or ckfs.<...>")
    return API.joinpath(*rest)


def protos(root: Path) -> list[Path]:
    """Every proto under ``ckfs/api``, relative to *root*, checked for its place.

    Raises:
        ProtoError: a file is not in its package's directory, or two files
            share one package.
    """
    found = sorted(p.relative_to(root) for p in (root / API).rglob("*.proto"))
    seen: dict[str, Path] = {}
    for proto in found:
        package = package_of(root / proto)
        if proto.parent != package_dir(package):
            raise ProtoError(f"{proto}: package {package} belongs in {package_dir(package)}/")
        if package in seen:
            raise ProtoError(f"{proto}: package {package} already has {seen[package]}")
        seen[package] = proto
    return found


def outputs(proto: Path) -> list[Path]:
    """The files generated for *proto*."""
    stem = proto.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in SUFFIXES]


def packages(files: Sequence[Path]) -> list[Path]:
    """The ``__init__.py`` each generated module's Python package needs.

    Only their existence matters: the committed ones carry docstrings, so
    they are created when missing and never compared.
    """
    found = set()
    for path in files:
        d = path.parent
        while d != API.parent:
            found.add(d / "__init__.py")
            d = d.parent
    return sorted(found)


def _plugin(name: str) -> str:
    """``--plugin`` for mypy-protobuf's protoc plugin, found beside this interpreter.

    Raises:
        ProtoError: mypy-protobuf is not installed (the ``grpc`` extra).
    """
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise ProtoError(f"{name} not found: install the grpc extra (mypy-protobuf)")
        path = Path(found)
    return f"--plugin={name}={path}"


def generate(root: Path, out: Path) -> list[Path]:
    """Write the modules of every proto under *root* into *out*; their paths.

    Raises:
        ProtoError: a proto is misplaced or protoc rejected one.
    """
    import grpc_tools
    from grpc_tools import protoc

    found = protos(root)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={well_known}",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *(str(p) for p in found),
    ]
    if protoc.main(args) != 0:
        raise ProtoError("protoc failed (its message is above)")
    return [path for proto in found for path in outputs(proto)]


def stale(root: Path, generated: Path, files: Sequence[Path]) -> list[str]:
    """What differs between *root*'s tree and a fresh generation of *files*."""
    problems = []
    for path in files:
        mine, fresh = root / path, generated / path
        if not mine.exists():
            problems.append(f"{path}: missing")
        elif not filecmp.cmp(mine, fresh, shallow=False):
            problems.append(f"{path}: differs from what the protos generate")
    problems += [f"{init}: missing" for init in packages(files) if not (root / init).exists()]
    problems += [f"{orphan}: generated from no proto" for orphan in orphans(root, files)]
    return problems


def orphans(root: Path, files: Sequence[Path]) -> list[Path]:
    """Generated modules in *root* whose proto is gone."""
    expected = set(files)
    found = {p.relative_to(root) for s in SUFFIXES for p in (root / API).rglob(f"*{s}")}
    return sorted(found - expected)


def update(root: Path, generated: Path, files: Sequence[Path]) -> list[Path]:
    """Copy what changed from *generated* into *root*; the paths written.

    Unchanged files are left alone (mtimes too), so a second run writes nothing.
    Modules whose proto is gone are removed.
    """
    changed = []
    for init in packages(files):
        if not (root / init).exists():
            (root / init).touch()
            changed.append(init)
    for path in files:
        mine, fresh = root / path, generated / path
        if mine.exists() and filecmp.cmp(mine, fresh, shallow=False):
            continue
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fresh, mine)
        changed.append(path)
    for orphan in orphans(root, files):
        (root / orphan).unlink()
        changed.append(orphan)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ckfs_protos", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="Change nothing; exit 1 when the committed modules are stale.",
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="The repository (default: %(default)s)."
    )
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    with tempfile.TemporaryDirectory(prefix="ckfs-protos-") as tmp:
        try:
            files = generate(root, Path(tmp))
        except ProtoError as e:
            print(f"protos: {e}", file=sys.stderr)
            return 1
        if args.check:
            problems = stale(root, Path(tmp), files)
            for line in problems:
                print(f"protos: {line}; run `make protos`", file=sys.stderr)
            return 1 if problems else 0
        for path in update(root, Path(tmp), files):
            print(f"protos: wrote {path}")
    return 0
