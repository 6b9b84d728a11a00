"""Hostile eStargz layers through the real registry and ``ckfs pull --lazy``.

Each image holds an honest eStargz layer and, above it, one layer written by
`tests.hostile_toc` to lie in one of the ways the issue lists. The pull
must end by the issue's contract: exit 0 with the hostile layer refused
loudly (one stderr line naming it, unpacked eagerly instead) while the
honest layer is indexed, or exit 1 with one clean error line naming it (a
TOC that does not match its annotation: DataLoss); never a traceback,
never an index of the hostile layer. The file's name runs it confined
(conftest.py): the eager fallback applies the hostile tar as root.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.conftest import Ckfs
from integration.estargz import write_layout
from integration.registry import Registry
from tests import hostile_toc as h

pytestmark = pytest.mark.slow

CASES: dict[str, Callable[[], h.Layer]] = {
    "through-symlink": h.through_symlink,
    "hardlink-out": h.hardlink_out,
    "chunk-past-blob": h.chunk_past_blob,
    "chunks-overlap": h.chunks_overlap,
    "chunks-gap": h.chunks_gap,
    "size-near-2**63": h.size_near_2_63,
    "inner-offset-huge": lambda: h.inner_offset_outside(1 << 40),
    "nested-deep": h.nested_deep,
    "footer-into-member": h.footer_into_member,
    "footer-into-data": h.footer_into_data,
    "footer-truncated": h.footer_truncated,
    "toc-mismatch": lambda: h.estargz(h.files(2), toc_digest="sha256:" + "0" * 64),
}


def diff_id(layer: h.Layer) -> str:
    """The digest of what the blob inflates to (a truncated tail left out)."""
    out, data = hashlib.sha256(), layer.blob
    while data:
        inflater = zlib.decompressobj(wbits=31)
        out.update(inflater.decompress(data))
        if not inflater.eof:
            break
        data = inflater.unused_data
    return "sha256:" + out.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_estargz_layer_falls_back_loudly(
    case: str, ckfs: Ckfs, registry: Registry, tmp_path: Path
) -> None:
    honest, hostile = h.estargz(h.files()), CASES[case]()
    layout = write_layout(
        tmp_path / "layout",
        [(x.desc, x.blob, diff_id(x)) for x in (honest, hostile)],
    )
    repo = f"ckfs/hostile-estargz:{case.replace('*', '')}"
    registry.push(layout, repo)
    proc = ckfs.run("pull", "--lazy", "--plain-http", f"{registry.host}/{repo}", check=False)
    assert "Traceback" not in proc.stderr
    print(f"{case}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    indexed = {p.parent.name for p in (ckfs.root / "layers").rglob("index.db")}
    assert hostile.desc.digest.hex not in indexed
    if proc.returncode == 0:
        lines = [line for line in proc.stderr.splitlines() if hostile.desc.digest.hex in line]
        assert len(lines) == 1 and "eagerly" in lines[0], proc.stderr
        assert honest.desc.digest.hex in indexed
    else:
        assert proc.returncode == 1, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ckfs: ")]
        assert len(errors) == 1 and hostile.desc.digest.hex in errors[0], proc.stderr
