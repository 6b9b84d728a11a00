"""A million-entry layer index: built, listed and searched within bounds.

The issue asks that a layer of 1,000,000 entries list in seconds and stay
out of the serving process's memory. Wall-time bounds here are generous
for a loaded two-core machine (it takes about a tenth of them idle); the
memory bound is measured in a fresh process, as the FUSE server would open
the index.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckfs.archive.entry import Entry, Kind
from ckfs.layerindex.model import ROOT, IndexWriter
from tests.layerindexes import LAYER

pytestmark = pytest.mark.slow

ENTRIES = 1_000_000
PER_DIR = 1000

#: Generous wall-time bounds, seconds.
BUILD = 150.0
LIST = 60.0

#: What opening, listing and searching the index may add to a fresh
#: process's peak RSS, in MB: the index lives on disk, not in memory.
GROWTH_MB = 30


def test_a_million_entries(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    t = time.monotonic()
    with IndexWriter(path, layer=LAYER, source="tar", blob_size=1 << 50) as w:
        for i in range(ENTRIES // PER_DIR):
            for j in range(PER_DIR):
                w.add(Entry(f"d{i}/f{j}", Kind.FILE, size=j), data=j)
        w.commit().close()
    assert time.monotonic() - t < BUILD
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from ckfs.layerindex.model import LayerIndex, iter_nodes

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        base = hwm()
        index = LayerIndex.open(Path({str(path)!r}))
        t = time.monotonic()
        n = sum(1 for _ in iter_nodes(index))
        took = time.monotonic() - t
        d = index.lookup({ROOT}, "d777")
        f = index.lookup(d.ino, "f999")
        assert f.size == 999 and len(index.children(d.ino, 990, 100)) == 10
        print(n, took, hwm() - base)
        """
    )
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=repo
    ).stdout.split()
    count, took, growth = int(out[0]), float(out[1]), float(out[2])
    assert count == ENTRIES + ENTRIES // PER_DIR
    assert took < LIST
    assert growth < GROWTH_MB
