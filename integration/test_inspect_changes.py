"""``ckfs diff`` and ``ckfs space`` on the inspect image (integration/inspect_images.py).

The image is pushed in four encodings to a real docker-registry behind a
counting proxy: gzip and zstd are pulled whole, tar and eStargz recorded
lazily (``pull --lazy``). Every encoding must give the same JSON, which
must match the golden files in integration/golden/ (reviewed by hand:
regenerate with ``CKFS_UPDATE_GOLDEN=1`` and read the diff).

- per-layer changes: layer 2's rewrite of ``etc/motd`` at the same size,
  its whiteout and opaque directory; layer 3's directory replaced by a
  file and its mode-only change of ``etc/hosts``; layer 4's deletion;
- an image-to-image diff against the same image cut at layer 2 (imported
  from a layout): what layers 3 and 4 make of the tree, equal entries left
  out;
- the space report: every wasted version with who stored and who wasted it;
- the same with a ckfsd serving the root (the pull goes through it);
- on lazily recorded images, ``space`` and ``diff --no-read`` fetch no
  layer data, and ``diff`` on eStargz fetches none either (chunk digests
  answer), while on a plain tar it reads only the files whose sizes match
  (with the spans that verify them); between images, eStargz digests on
  one side have only the other side read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ckfs.layerindex.tarindex import SPAN
from integration.conftest import Ckfs
from integration.inspect_images import VARIANTS, InspectImages

GOLDEN = Path(__file__).resolve().parent / "golden"

#: Encodings ``pull --lazy`` records without fetching their layers.
LAZY = ("tar", "estargz")


def pull(ckfs: Ckfs, images: InspectImages, variant: str) -> str:
    ref = images.ref(variant, proxied=True)
    ckfs.run("pull", *(["--lazy"] if variant in LAZY else []), ref)
    return ref


def run_json(ckfs: Ckfs, *args: str) -> Any:
    return json.loads(ckfs.run(*args, "--json").stdout)


def golden(name: str, found: Any) -> None:
    """*found* must equal the golden file *name* (written instead when asked)."""
    path = GOLDEN / f"{name}.json"
    text = json.dumps(found, indent=2) + "\n"
    if os.environ.get("CKFS_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert json.loads(path.read_text()) == found


def without_image(doc: dict[str, Any]) -> dict[str, Any]:
    """The report without the name it was asked by (which differs per variant)."""
    return {k: v for k, v in doc.items() if k not in ("image", "from", "to")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_changes_golden(ckfs: Ckfs, inspect_images: InspectImages, variant: str) -> None:
    ref = pull(ckfs, inspect_images, variant)
    every = run_json(ckfs, "diff", ref)
    golden("diff_layers", without_image(every))
    one = run_json(ckfs, "diff", ref, "--layer", "3")
    assert one["layer"] == 3
    assert one["changes"] == [c for c in every["changes"] if c["layer"] == 3]


@pytest.mark.parametrize("variant", VARIANTS)
def test_space_golden(ckfs: Ckfs, inspect_images: InspectImages, variant: str) -> None:
    ref = pull(ckfs, inspect_images, variant)
    golden("space", without_image(run_json(ckfs, "space", ref, "--top", "0")))
    cut = run_json(ckfs, "space", ref, "--top", "2")
    assert len(cut["waste"]) == len(cut["largest"]) == 2


@pytest.mark.parametrize("ckfs", ["ckfsd"], indirect=True)
def test_the_same_with_a_ckfsd_serving_the_root(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    ref = pull(ckfs, inspect_images, "estargz")
    golden("diff_layers", without_image(run_json(ckfs, "diff", ref)))
    golden("space", without_image(run_json(ckfs, "space", ref, "--top", "0")))


def _cut_layout(layout: Path, keep: int) -> Path:
    """A copy of *layout* whose image has only its first *keep* layers."""
    blobs = layout / "blobs" / "sha256"

    def read(digest: str) -> Any:
        return json.loads((blobs / digest.removeprefix("sha256:")).read_bytes())

    def put(doc: Any) -> dict[str, Any]:
        data = json.dumps(doc).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    index = json.loads((layout / "index.json").read_text())
    manifest = read(index["manifests"][0]["digest"])
    config = read(manifest["config"]["digest"])
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:keep]
    # The history up to the last kept layer's entry (empty-layer entries between).
    made = [i for i, h in enumerate(config["history"]) if not h.get("empty_layer")]
    config["history"] = config["history"][: made[keep - 1] + 1]
    manifest["layers"] = manifest["layers"][:keep]
    manifest["config"].update(put(config))
    index["manifests"][0].update(put(manifest))
    (layout / "index.json").write_text(json.dumps(index))
    return layout


@pytest.mark.parametrize("variant", ["gzip", "estargz"])
def test_image_diff_golden(
    ckfs: Ckfs, inspect_images: InspectImages, variant: str, tmp_path: Path
) -> None:
    from integration.inspect_images import layout

    full = pull(ckfs, inspect_images, variant)
    built = layout(tmp_path / "build" / "layout", variant)
    cut = _cut_layout(shutil.copytree(built, tmp_path / "cut"), 2)
    ckfs.run("import", "--name", "example.local/inspect/cut:latest", str(cut))
    found = run_json(ckfs, "diff", "example.local/inspect/cut:latest", full)
    golden("diff_images", without_image(found))
    assert run_json(ckfs, "diff", full, full)["changes"] == []


def test_lazy_images_fetch_no_layer_data(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    proxy = inspect_images.proxy
    for variant in LAZY:
        ref = pull(ckfs, inspect_images, variant)
        before = proxy.body_bytes()
        run_json(ckfs, "space", ref)
        run_json(ckfs, "diff", ref, "--no-read")
        assert proxy.body_bytes() == before, variant
        run_json(ckfs, "diff", ref)
        fetched = proxy.body_bytes() - before
        if variant == "estargz":
            assert fetched == 0  # chunk digests answered every same-size file
        else:
            # etc/motd and etc/hosts of layers 1-3, each read with the span
            # that verifies it: layer 1's first span, the small layers whole.
            assert 0 < fetched <= 2 * SPAN


def test_a_digest_on_one_side_fetches_only_the_other(
    ckfs: Ckfs, inspect_images: InspectImages
) -> None:
    """Against a lazy eStargz image, whose chunk digests answer for its side,
    only the other image's files are read: nothing fetched when it is pulled,
    only its own bytes when it is lazy too."""
    proxy = inspect_images.proxy
    estargz, tar = pull(ckfs, inspect_images, "estargz"), pull(ckfs, inspect_images, "tar")
    pulled = pull(ckfs, inspect_images, "gzip")
    seen = len(proxy.requests())
    assert run_json(ckfs, "diff", pulled, estargz)["changes"] == []
    assert run_json(ckfs, "diff", estargz, tar)["changes"] == []
    fetched = {r.path.split("/")[3] for r in proxy.requests()[seen:]}  # /v2/inspect/VARIANT/
    assert fetched == {"tar"}


def test_bad_input_is_one_line(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    ref = pull(ckfs, inspect_images, "gzip")
    assert "out of range" in ckfs.fails("diff", ref, "--layer", "5")
    assert "not found" in ckfs.fails("space", "example.local/no/such:latest")
    assert ckfs.run("diff", ref, ref, "--layer", "1", check=False).returncode == 2
