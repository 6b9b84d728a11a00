"""Manifests, indexes and image configs (ckfs.images.manifest, ckfs.images.config).

Bodies come from registries and archives, so most cases here are hostile or
malformed inputs, asserted by exception class and the part of the message a
user needs (which blob, which field).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import from_bytes
from ckfs.errors import InvalidArgument
from ckfs.images import (
    MAX_MANIFEST_SIZE,
    Index,
    Manifest,
    children,
    index_json,
    manifest_json,
    parse,
    parse_config,
)


def _blob(media_type: str, data: bytes, **kw: Any) -> Descriptor:
    return Descriptor(media_type=media_type, digest=from_bytes(data), size=len(data), **kw)


CONFIG = _blob(mt.OCI_CONFIG, b'{"config":1}')
LAYERS = [_blob(mt.OCI_LAYER_GZIP, b"layer0"), _blob(mt.OCI_LAYER_ZSTD, b"layer1")]
AMD64 = _blob(mt.OCI_MANIFEST, b"m-amd64", platform=Platform("linux", "amd64"))
ARM64 = _blob(mt.OCI_MANIFEST, b"m-arm64", platform=Platform("linux", "arm64", "v8"))


def _manifest_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": CONFIG.to_json(),
        "layers": [d.to_json() for d in LAYERS],
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def _index_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [AMD64.to_json(), ARM64.to_json()],
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def _parse(media_type: str, body: Any) -> Index | Manifest:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse(_blob(media_type, data), data)


# -- parse: good ---------------------------------------------------------------


def test_parse_oci_manifest() -> None:
    m = _parse(mt.OCI_MANIFEST, _manifest_body(annotations={"a": "b"}))
    assert isinstance(m, Manifest)
    assert m.media_type == mt.OCI_MANIFEST
    assert m.config == CONFIG
    assert m.layers == tuple(LAYERS)
    assert m.annotations == {"a": "b"}
    assert m.subject is None
    assert m.is_image and m.artifact_type == ""


def test_parse_oci_index() -> None:
    i = _parse(mt.OCI_INDEX, _index_body())
    assert isinstance(i, Index)
    assert i.manifests == (AMD64, ARM64)
    assert i.manifests[1].platform == Platform("linux", "arm64", "v8")


def test_parse_docker_manifest_and_list() -> None:
    body = _manifest_body(
        mediaType=mt.DOCKER_MANIFEST,
        config=CONFIG.replace(media_type=mt.DOCKER_CONFIG).to_json(),
        layers=[LAYERS[0].replace(media_type=mt.DOCKER_LAYER_GZIP).to_json()],
    )
    m = _parse(mt.DOCKER_MANIFEST, body)
    assert isinstance(m, Manifest) and m.is_image
    i = _parse(mt.DOCKER_MANIFEST_LIST, _index_body(mediaType=mt.DOCKER_MANIFEST_LIST))
    assert isinstance(i, Index) and i.media_type == mt.DOCKER_MANIFEST_LIST


@pytest.mark.parametrize(
    ("media_type", "body", "kind"),
    [
        pytest.param(mt.OCI_MANIFEST, _manifest_body(mediaType=None), Manifest, id="manifest"),
        pytest.param(mt.OCI_INDEX, _index_body(mediaType=None), Index, id="index"),
    ],
)
def test_oci_body_may_omit_media_type(media_type: str, body: Any, kind: type) -> None:
    parsed = _parse(media_type, body)
    assert isinstance(parsed, kind)
    assert parsed.media_type == media_type


def test_artifact_config_recorded_and_subject() -> None:
    helm_config = _blob("application/vnd.cncf.helm.config.v1+json", b"{}")
    m = _parse(
        mt.OCI_MANIFEST,
        _manifest_body(config=helm_config.to_json(), subject=AMD64.to_json()),
    )
    assert isinstance(m, Manifest)
    assert m.artifact_type == "application/vnd.cncf.helm.config.v1+json"
    assert not m.is_image
    assert m.subject == AMD64

    typed = _parse(mt.OCI_MANIFEST, _manifest_body(artifactType="application/x-sbom"))
    assert isinstance(typed, Manifest) and typed.artifact_type == "application/x-sbom"


def test_manifest_without_layers() -> None:
    m = _parse(mt.OCI_MANIFEST, _manifest_body(layers=[]))
    assert isinstance(m, Manifest) and m.layers == ()


# -- parse: bad ----------------------------------------------------------------


BAD = [
    ("not-json", mt.OCI_MANIFEST, b"{nope", "invalid JSON"),
    ("not-utf8", mt.OCI_MANIFEST, b"\xff\xfe", "invalid JSON"),
    ("json-array", mt.OCI_MANIFEST, b"[]", "invalid JSON: expected an object"),
    ("no-schema-version", mt.OCI_MANIFEST, _manifest_body(schemaVersion=None), "schemaVersion"),
    ("schema-version-3", mt.OCI_MANIFEST, _manifest_body(schemaVersion=3), "schemaVersion"),
    ("schema-version-true", mt.OCI_MANIFEST, _manifest_body(schemaVersion=True), "schemaVersion"),
    (
        "schema1-by-media-type",
        mt.DOCKER_SCHEMA1_SIGNED,
        {"schemaVersion": 1, "fsLayers": []},
        "Docker schema 1 manifests are not supported; re-push the image with a current client",
    ),
    (
        "schema1-by-body",
        mt.DOCKER_MANIFEST,
        {"schemaVersion": 1, "name": "x", "fsLayers": [], "history": []},
        "Docker schema 1",
    ),
    (
        "schema1-body-media-type",
        mt.DOCKER_MANIFEST,
        {"schemaVersion": 2, "mediaType": mt.DOCKER_SCHEMA1},
        "Docker schema 1",
    ),
    (
        "unknown-media-type",
        "application/json",
        _manifest_body(mediaType=None),
        "unknown media type",
    ),
    (
        "body-disagrees",
        mt.OCI_MANIFEST,
        _manifest_body(mediaType=mt.DOCKER_MANIFEST),
        "media type mismatch",
    ),
    ("manifest-type-index-body", mt.OCI_MANIFEST, _index_body(mediaType=None), "body is an index"),
    (
        "index-type-manifest-body",
        mt.OCI_INDEX,
        _manifest_body(mediaType=None),
        "body is a manifest",
    ),
    (
        "both-shapes",
        mt.OCI_INDEX,
        _index_body(mediaType=None, layers=[]),
        "both manifests and config/layers",
    ),
    ("missing-config", mt.OCI_MANIFEST, _manifest_body(config=None), "config: expected an object"),
    (
        "bad-layer-digest",
        mt.OCI_MANIFEST,
        _manifest_body(
            layers=[LAYERS[0].to_json(), {**LAYERS[1].to_json(), "digest": "sha256:abc"}]
        ),
        "layers[1]: invalid digest",
    ),
    (
        "negative-size",
        mt.OCI_INDEX,
        _index_body(manifests=[{**AMD64.to_json(), "size": -1}]),
        "manifests[0]: size must be a non-negative integer",
    ),
    (
        "unknown-layer-type",
        mt.OCI_MANIFEST,
        _manifest_body(layers=[LAYERS[0].to_json(), {**LAYERS[1].to_json(), "mediaType": "x/y"}]),
        "layers[1]: unknown layer media type 'x/y'",
    ),
    ("layers-not-list", mt.OCI_MANIFEST, _manifest_body(layers={}), "layers must be a list"),
    ("manifests-not-list", mt.OCI_INDEX, _index_body(manifests=None), "manifests must be a list"),
    ("bad-annotations", mt.OCI_MANIFEST, _manifest_body(annotations={"a": 1}), "annotations"),
    ("bad-subject", mt.OCI_MANIFEST, _manifest_body(subject={"size": 1}), "subject: missing"),
]


@pytest.mark.parametrize(
    ("media_type", "body", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD]
)
def test_parse_rejects(media_type: str, body: Any, message: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    desc = _blob(media_type, data)
    with pytest.raises(InvalidArgument) as info:
        parse(desc, data)
    assert str(info.value).startswith(f"manifest {desc.digest}: ")
    assert message in str(info.value)


def test_parse_rejects_oversized_body() -> None:
    body = _manifest_body(annotations={"pad": "x" * MAX_MANIFEST_SIZE})
    with pytest.raises(InvalidArgument, match="exceeds"):
        _parse(mt.OCI_MANIFEST, body)


# -- children ------------------------------------------------------------------


def test_children() -> None:
    m = json.dumps(_manifest_body()).encode()
    assert children(_blob(mt.OCI_MANIFEST, m), m) == [CONFIG, *LAYERS]
    i = json.dumps(_index_body()).encode()
    assert children(_blob(mt.OCI_INDEX, i), i) == [AMD64, ARM64]
    assert children(CONFIG, b"") == []
    assert children(LAYERS[0], b"\x1f\x8b") == []
    assert children(_blob("application/vnd.in-toto+json", b"{}"), b"{}") == []


def test_children_walks_artifacts_parse_rejects() -> None:
    # An attestation manifest (BuildKit) has in-toto "layers": fetchable, not unpackable.
    body = _manifest_body(layers=[_blob("application/vnd.in-toto+json", b"{}").to_json()])
    data = json.dumps(body).encode()
    desc = _blob(mt.OCI_MANIFEST, data)
    assert len(children(desc, data)) == 2
    with pytest.raises(InvalidArgument, match="unknown layer media type"):
        parse(desc, data)


def test_children_refuses_schema1() -> None:
    with pytest.raises(InvalidArgument, match="schema 1"):
        children(_blob(mt.DOCKER_SCHEMA1, b"{}"), b"{}")


# -- writing -------------------------------------------------------------------


def test_manifest_json_roundtrip_and_canonical() -> None:
    data = manifest_json(CONFIG, LAYERS)
    assert data == manifest_json(CONFIG, list(LAYERS))  # deterministic
    assert b" " not in data
    keys = list(json.loads(data))
    assert keys == sorted(keys)
    m = parse(_blob(mt.OCI_MANIFEST, data), data)
    assert isinstance(m, Manifest) and m.config == CONFIG and m.layers == tuple(LAYERS)

    docker = manifest_json(
        CONFIG.replace(media_type=mt.DOCKER_CONFIG),
        [LAYERS[0].replace(media_type=mt.DOCKER_LAYER_GZIP)],
        mt.DOCKER_MANIFEST,
    )
    assert json.loads(docker)["mediaType"] == mt.DOCKER_MANIFEST


def test_index_json_roundtrip() -> None:
    data = index_json([AMD64, ARM64], {"org.opencontainers.image.ref.name": "1.0"})
    i = parse(_blob(mt.OCI_INDEX, data), data)
    assert isinstance(i, Index)
    assert i.manifests == (AMD64, ARM64)
    assert i.annotations == {"org.opencontainers.image.ref.name": "1.0"}


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: manifest_json(CONFIG, LAYERS, mt.OCI_INDEX), id="index-type"),
        pytest.param(lambda: manifest_json(CONFIG, [CONFIG]), id="config-as-layer"),
        pytest.param(
            lambda: manifest_json(CONFIG, [], mt.DOCKER_MANIFEST, annotations={"a": "b"}),
            id="docker-annotations",
        ),
        pytest.param(lambda: index_json([], media_type=mt.OCI_MANIFEST), id="manifest-type"),
        pytest.param(
            lambda: index_json([], {"a": "b"}, media_type=mt.DOCKER_MANIFEST_LIST),
            id="docker-list-annotations",
        ),
    ],
)
def test_writers_reject(call: Any) -> None:
    with pytest.raises(InvalidArgument):
        call()


# -- image config --------------------------------------------------------------

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64

FULL_CONFIG = {
    "architecture": "arm64",
    "os": "linux",
    "variant": "v8",
    "created": "2024-05-01T10:00:00.123456789Z",
    "config": {
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": None,
        "Env": ["PATH=/usr/bin", "A=1"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
        "Labels": {"org.opencontainers.image.title": "x"},
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "StopSignal": "SIGTERM",
        "Volumes": {"/data": {}},
    },
    "rootfs": {"type": "layers", "diff_ids": [A, B]},
    "history": [
        {"created": "2024-05-01T10:00:00Z", "created_by": "ADD rootfs.tar /"},
        {"created_by": "ENV A=1", "empty_layer": True, "comment": "c", "author": "me"},
        {"created_by": "RUN true", "empty_layer": None},
    ],
}


def test_parse_config_full() -> None:
    cfg = parse_config(json.dumps(FULL_CONFIG).encode(), where="config x")
    assert cfg.diff_ids == (A, B)
    assert cfg.platform() == Platform("linux", "arm64", "v8")
    assert cfg.entrypoint == ("/bin/sh", "-c")
    assert cfg.cmd is None
    assert cfg.env == ("PATH=/usr/bin", "A=1")
    assert (cfg.working_dir, cfg.user, cfg.stop_signal) == ("/srv", "1000:1000", "SIGTERM")
    assert cfg.labels == {"org.opencontainers.image.title": "x"}
    assert cfg.exposed_ports == ("53/udp", "8080/tcp")
    assert cfg.created == "2024-05-01T10:00:00.123456789Z"
    assert [h.empty_layer for h in cfg.history] == [False, True, False]
    assert cfg.history[1].author == "me"
    assert cfg.raw["config"]["Volumes"] == {"/data": {}}


def test_parse_config_minimal() -> None:
    cfg = parse_config(b'{"rootfs":{"type":"layers","diff_ids":[]}}', where="c")
    assert cfg.diff_ids == () and cfg.entrypoint is None and cfg.env == ()
    assert cfg.platform() == Platform("", "")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"rootfs": None}, "rootfs: expected an object", id="no-rootfs"),
        pytest.param({"rootfs": {"type": "tar"}}, "rootfs.type must be 'layers'", id="type"),
        pytest.param(
            {"rootfs": {"type": "layers", "diff_ids": [A, "sha256:xyz"]}},
            "rootfs.diff_ids[1]: invalid digest",
            id="bad-diff-id",
        ),
        pytest.param({"architecture": 64}, "architecture must be a string", id="arch-type"),
        pytest.param({"config": {"Env": "A=1"}}, "Env must be a list of strings", id="env"),
        pytest.param({"config": {"Labels": {"a": 1}}}, "config.Labels", id="labels"),
        pytest.param({"history": [{"empty_layer": "yes"}]}, "history[0]: empty_layer", id="hist"),
        pytest.param({"config": []}, "config: expected an object", id="config-type"),
    ],
)
def test_parse_config_rejects(change: dict[str, Any], message: str) -> None:
    body = {**FULL_CONFIG, **change}
    with pytest.raises(InvalidArgument) as info:
        parse_config(json.dumps(body).encode(), where="config sha256:c")
    assert str(info.value).startswith("config sha256:c: ")
    assert message in str(info.value)


def test_parse_config_invalid_json() -> None:
    with pytest.raises(InvalidArgument, match=r"^config y: invalid JSON"):
        parse_config(b"\x00", where="config y")
