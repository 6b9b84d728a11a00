"""containerd's label names and how gc reads its reference labels."""

from __future__ import annotations

from ckfs import labels


def test_names_are_containerds() -> None:
    """The wire names, spelled out once more: a typo here is a silent gc bug."""
    assert labels.GC_ROOT == "containerd.io/gc.root"
    assert labels.gc_snapshot_label("overlayfs") == "containerd.io/gc.ref.snapshot.overlayfs"
    assert labels.GC_REF_CONTENT == "containerd.io/gc.ref.content"
    assert labels.SNAPSHOT_REF == "containerd.io/snapshot.ref"
    assert labels.DISTRIBUTION_SOURCE == "containerd.io/distribution.source"


def test_reference_labels_read_as_containerd_reads_them() -> None:
    found = {
        "containerd.io/gc.ref.snapshot.overlayfs": "a",
        "containerd.io/gc.ref.snapshot.native/1": "b",  # a suffix: several per snapshotter
        "containerd.io/gc.ref.snapshot.": "c",  # no snapshotter: nothing
        "containerd.io/gc.ref.snapshot.native/2": "",  # no key: nothing
        "containerd.io/gc.ref.content": "sha256:1",
        "containerd.io/gc.ref.content.l.0": "sha256:2",
        "containerd.io/gc.ref.content/x": "sha256:4",
        "containerd.io/gc.ref.contentious": "sha256:3",  # another label altogether
        "containerd.io/gc.root": "2026-01-01T00:00:00Z",
    }
    assert sorted(labels.snapshot_refs(found)) == [("native", "b"), ("overlayfs", "a")]
    assert sorted(v for _, v in labels.content_refs(found)) == ["sha256:1", "sha256:2", "sha256:4"]
