"""`ckfs.lazy`'s decisions, on real indexes: which source a layer gets, which
blobs a lazy pull skips, which layers must be unpacked after all, and the
chain-ID records containerd's prepares are answered from.

The end-to-end paths (a registry, the FUSE server, overlayfs) run in
``integration/test_lazy_mount.py`` and its neighbours.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckfs import lazy
from ckfs import mediatypes as mt
from ckfs.archive.entry import Entry, Kind
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.layerindex.estargz import TOC_DIGEST_ANNOTATION
from ckfs.layerindex.store import IndexStore
from ckfs.state import State
from tests.tarbuild import D, L, W, compress, tar
from tests.test_unpack import put_blob


def layer(name: str, media_type: str = mt.OCI_LAYER_GZIP, **annotations: str) -> Descriptor:
    return Descriptor(media_type, from_bytes(name.encode()), 100, annotations=annotations)


def index(root: Path, desc: Descriptor, entries: list[Entry]) -> None:
    writer = IndexStore(root).writer(desc.digest, source="gzip-index", blob_size=desc.size)
    writer.add(Entry("", Kind.DIR, mode=0o755))
    for entry in entries:
        writer.add(entry)
    writer.commit().close()


def test_each_layer_gets_its_best_source() -> None:
    toc = str(from_bytes(b"toc"))
    assert lazy.source_of(layer("a", **{TOC_DIGEST_ANNOTATION: toc})) == lazy.ESTARGZ
    assert lazy.source_of(layer("b")) == lazy.GZIP
    assert lazy.source_of(layer("c", mt.DOCKER_LAYER)) == lazy.TAR
    assert lazy.source_of(layer("d", mt.OCI_LAYER_ZSTD)) == lazy.EAGER


def test_a_lazy_pull_skips_the_layers_read_by_range() -> None:
    config = Descriptor(mt.OCI_CONFIG, from_bytes(b"config"), 10)
    esgz = layer("e", **{TOC_DIGEST_ANNOTATION: str(from_bytes(b"toc"))})
    gz, tar, zstd = layer("g"), layer("t", mt.OCI_LAYER), layer("z", mt.OCI_LAYER_ZSTD)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [d.to_json() for d in (esgz, gz, tar, zstd)],
    }
    body = json.dumps(manifest).encode()
    desc = Descriptor(mt.OCI_MANIFEST, from_bytes(body), len(body))
    assert lazy.lazy_children()(desc, body) == [config, gz, zstd]


def test_a_layer_implying_a_dir_over_a_lower_link_is_unpacked(tmp_path: Path) -> None:
    base, merged, fine = layer("base"), layer("usrmerge"), layer("fine")
    index(tmp_path, base, [Entry("usr", Kind.DIR), Entry("lib", Kind.SYMLINK, link="usr/lib")])
    index(tmp_path, merged, [Entry("lib/x.so", Kind.FILE)])  # lib/ implied, below the link
    index(tmp_path, fine, [Entry("usr/lib/y.so", Kind.FILE)])
    plans = [lazy.LayerPlan(d, lazy.GZIP) for d in (base, merged, fine)]
    out = lazy._through_links(tmp_path, plans)
    assert [p.source for p in out] == [lazy.GZIP, lazy.EAGER, lazy.GZIP]
    assert "'lib'" in out[1].why and "link" in out[1].why


def test_an_eager_lower_link_counts_too(tmp_path: Path) -> None:
    """A zstd base (no index: unpacked) holding ``lib -> usr/lib`` under a lazy
    layer that implies ``lib/``: read from the base's blob, the lazy layer is
    unpacked too; one whose directories avoid the link stays lazy."""
    state = State(tmp_path)
    try:
        base = compress(tar(D("usr"), D("usr/lib"), L("lib", "usr/lib"), W(".wh.sbin")), "zstd")
        put_blob(state, base.data)
        eager = Descriptor(base.media_type, from_bytes(base.data), len(base.data))
        merged, fine, later = layer("usrmerge"), layer("fine"), layer("later")
        index(tmp_path, merged, [Entry("lib/x.so", Kind.FILE)])
        index(tmp_path, fine, [Entry("usr/lib/y.so", Kind.FILE), Entry("sbin/z", Kind.FILE)])
        index(tmp_path, later, [Entry("lib/z.so", Kind.FILE)])
        plans = [lazy.LayerPlan(eager, lazy.EAGER, "zstd")]
        plans += [lazy.LayerPlan(d, lazy.GZIP) for d in (merged, fine)]
        out = lazy._through_links(tmp_path, plans, state.content)
        assert [p.source for p in out] == [lazy.EAGER, lazy.EAGER, lazy.GZIP]
        assert "'lib'" in out[1].why and "link" in out[1].why
        # Without its blob the base is passed over (its unpack fails on its own).
        absent = Descriptor(mt.OCI_LAYER_ZSTD, from_bytes(b"absent"), 10)
        plans = [lazy.LayerPlan(absent, lazy.EAGER), lazy.LayerPlan(later, lazy.GZIP)]
        assert lazy._through_links(tmp_path, plans, state.content)[1].source == lazy.GZIP
    finally:
        state.close()


def test_chain_records_name_each_lazy_layer_and_its_parent(tmp_path: Path) -> None:
    a, b, c = layer("a"), layer("b", mt.OCI_LAYER_ZSTD), layer("c")
    chain = [from_bytes(b"chain a"), from_bytes(b"chain b"), from_bytes(b"chain c")]
    plans = [lazy.LayerPlan(a, lazy.GZIP), lazy.LayerPlan(b, lazy.EAGER), lazy.LayerPlan(c, "tar")]
    lazy.record_chains(tmp_path, chain, plans)
    lazy.record_chains(tmp_path, chain, plans)  # again: unchanged records stay as they are
    assert lazy.chain_layer(tmp_path, str(chain[0])) == (a.digest, "")
    assert lazy.chain_layer(tmp_path, str(chain[1])) is None  # eager: nothing serves it
    assert lazy.chain_layer(tmp_path, str(chain[2])) == (c.digest, str(chain[1]))
    assert lazy.chain_layer(tmp_path, "not a digest") is None
    assert lazy.chain_layer(tmp_path, str(Digest.from_hex("sha256", "0" * 64))) is None


def test_a_chain_now_eager_loses_its_lazy_record(tmp_path: Path) -> None:
    # Recorded lazy by an earlier index (an older format, other limits); the
    # layer is unpacked now, so containerd's prepare must not attach it.
    a = layer("a")
    chain = [from_bytes(b"chain a")]
    lazy.record_chains(tmp_path, chain, [lazy.LayerPlan(a, lazy.GZIP)])
    lazy.record_chains(tmp_path, chain, [lazy.LayerPlan(a, lazy.EAGER, "refused")])
    assert lazy.chain_layer(tmp_path, str(chain[0])) is None
