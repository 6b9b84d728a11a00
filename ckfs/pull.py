"""Pull: a reference in, an image name out, fetching only what is missing.

The steps, as containerd's ``client.Pull`` takes them:

1. **Resolve** the reference to a target descriptor: a manifest ``HEAD``
   for a tag. A reference pinned by digest, or any pull with ``offline``,
   is first tried from local state alone (`pull_local`): if the target and
   everything the platform needs is present, the registry is not contacted
   at all (no HTTP client is even built, and neither trio nor httpx is
   imported). Outside an event loop, `pull_local` also answers a tag whose
   image is complete with one ``HEAD`` through the standard library.
2. **Fetch** the target and, recursively, what the platform needs
   (`ckfs.remotes.fetch`): only blobs the content store lacks cross the
   network, resumed where an earlier pull stopped.
3. **Register** the normalized name → target in the image store (skipped by
   ``ckfs fetch``, which is containerd's ``content fetch``). An unchanged
   name is left untouched, so a pull of a present image writes nothing.
4. **Report** what happened, blob by blob, through ``on_event`` and the
   returned `PullReport`.

A second pull of the same tag therefore costs one ``HEAD`` request and a
read of the local manifests; a pull by digest, none.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor
from ckfs.errors import InvalidArgument, NotFound, Unavailable
from ckfs.images import ImageStore
from ckfs.images import manifest as manifests
from ckfs.images.store import Image
from ckfs.jsondoc import parse_object
from ckfs.options import DEFAULTS, PullOptions
from ckfs.reference import Reference
from ckfs.remotes import time_budget
from ckfs.remotes.walk import (
    BlobProgress,
    FetchReport,
    check_limits,
    platform_children,
    present,
    seconds_text,
)

if TYPE_CHECKING:
    import httpx

    from ckfs.remotes.hosts import RegistryHost
    from ckfs.remotes.registry import RegistryClient
    from ckfs.remotes.walk import ChildrenFunc

__all__ = ["PullOptions", "PullReport", "client_for", "pull", "pull_local"]


@dataclasses.dataclass
class PullReport:
    """What a pull did.

    Attributes:
        reference: the normalized reference pulled.
        target: the descriptor it resolved to.
        fetch: the blob-by-blob record (`FetchReport`).
        image: the registered image, or None when nothing was registered
            (``ckfs fetch``).
        network: whether the registry was contacted.
        seconds: wall time of the whole pull.
    """

    reference: Reference
    target: Descriptor
    fetch: FetchReport
    image: Image | None
    network: bool
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The pull's summary, as the CLI's ``--json`` prints it last and ckfsd ends a Pull with."""
        f = self.fetch
        return {
            "event": "summary",
            "reference": str(self.reference),
            "name": self.image.name if self.image is not None else None,
            "target": self.target.to_json(),
            "blobs": len(f.blobs),
            "fetched_blobs": f.fetched_blobs,
            "fetched_bytes": f.fetched_bytes,
            "skipped_blobs": f.present_blobs,
            "nondistributable": [str(b.desc.digest) for b in f.skipped],
            "network": self.network,
            "seconds": round(self.seconds, 3),
        }


async def pull(
    ref: Reference,
    content: ContentStore,
    images: ImageStore,
    options: PullOptions = DEFAULTS,
    *,
    register: bool = True,
    children: ChildrenFunc | None = None,
    on_event: Callable[[BlobProgress], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PullReport:
    """Bring *ref* into the content store and, with *register*, name it.

    Args:
        ref: a normalized reference (`ckfs.reference.parse`).
        content: where blobs go.
        images: where the name goes.
        options: platform, registry access and limits (`PullOptions`);
            offline, the target is found by digest or by the name in
            *images* and everything must be present.
        register: record ``str(ref)`` → target in *images*; false for
            ``ckfs fetch``.
        children: which descriptors under a manifest or index to fetch,
            instead of `platform_children` for the options' platforms
            (`ckfs.unpack` wraps that one to refuse an image too deep to
            stack before any of its layers is fetched).
        on_event: called with a blob's progress at each state change.
        transport: an httpx transport for the registry client (tests).

    Returns:
        A `PullReport`.

    Raises:
        NotFound: the registry has no such image or blob; an index has no
            manifest for the platform; offline, the image or one of
            its blobs is not present (the message names what is missing).
        Unavailable: the registry cannot be reached (the message names the
            host), kept dropping connections, or a time budget ran out;
            partial downloads are kept for the next pull.
        DataLoss: a blob did not match its digest; nothing of it was kept.
        InvalidArgument: a malformed or Docker schema 1 manifest, a bad
            ``hosts.toml``, a blob over ``max_blob_size``, or a bad ``timeout``.
        FailedPrecondition: the registry refused the credentials, or the
            blobs to fetch need more than the free space.

    Cancellation:
        Downloads stop and keep what they received, for the next pull to
        resume; no name is registered.
    """
    started = time.monotonic()
    o = options
    check_limits(o.timeout, o.max_blob_size)
    # Store calls (SQLite, manifest reads) run in worker threads: in ckfsd
    # this loop serves every other RPC. Events stay on the loop's thread,
    # where a fetch reports them, since callers feed them to trio objects.
    import trio

    if o.offline or ref.digest is not None:
        local = await trio.to_thread.run_sync(
            functools.partial(pull_local, ref, content, images, o, register=register)
        )
        if local is not None:
            if on_event is not None:
                for blob in local.fetch.blobs:
                    on_event(blob)
            return local

    # Imported here so that pulls served from local state never load trio or httpx.
    from ckfs.remotes.bounds import Deadline
    from ckfs.remotes.fetch import fetch

    async with client_for(ref, o, transport=transport) as client:
        budget = Deadline.after(time_budget(0, o.timeout))
        gave_up = f"{ref}: resolving gave up after {seconds_text(budget.seconds)} s (--timeout)"
        with budget.raising(lambda: Unavailable(gave_up)):
            target = await client.resolve(ref)
        report = await fetch(
            client,
            content,
            ref,
            target,
            children=children or platform_children(o.platform, all_platforms=o.all_platforms),
            max_concurrent=o.max_concurrent,
            on_event=on_event,
            timeout=o.timeout,
            max_blob_size=o.max_blob_size,
        )
    finish = functools.partial(_finish, network=True, started=started)
    return await trio.to_thread.run_sync(finish, ref, images, report, register)


def client_for(
    ref: Reference, options: PullOptions, *, transport: httpx.AsyncBaseTransport | None = None
) -> RegistryClient:
    """A registry client for *ref*'s registry as *options* configure it (hosts, credentials).

    Every path that talks to a registry for a pull builds its client here,
    so mirrors, plain HTTP and credentials are read the same way.
    """
    from ckfs.remotes.auth import Credentials
    from ckfs.remotes.hosts import load_hosts
    from ckfs.remotes.registry import RegistryClient

    hosts = load_hosts(ref.domain, hosts_dirs=options.hosts_dirs, plain_http=options.plain_http)
    return RegistryClient(
        ref.domain, hosts=hosts, credentials=Credentials(options.user), transport=transport
    )


def pull_local(
    ref: Reference,
    content: ContentStore,
    images: ImageStore,
    options: PullOptions = DEFAULTS,
    *,
    register: bool = True,
    hosts: Sequence[RegistryHost] | None = None,
    on_event: Callable[[BlobProgress], None] | None = None,
) -> PullReport | None:
    """The pull, when everything it needs is already present; None otherwise.

    Synchronous and free of trio and httpx, so that asking again for an
    image one has costs milliseconds: `pull` starts with it, and the CLI
    calls it before starting an event loop at all.

    Of *options*, only the platforms, ``offline`` and ``timeout`` matter
    here; *register*, *on_event*: as `pull`.

    - A reference pinned by digest, or any offline pull, is answered from
      local state alone (offline, a tag means the name's current target).
    - A tag online, only when *hosts* are given: the name's current target,
      if complete, is confirmed by one blocking manifest ``HEAD``
      (`ckfs.remotes.peek`), within ``timeout`` if that is shorter than the
      peek's own deadline; only for callers outside an event loop.

    Returns:
        The report of a pull that fetched nothing (``network`` says whether
        the registry was asked), or None when the registry must be asked
        properly: the image is unknown or incomplete here, or the tag may
        have moved.

    Raises:
        NotFound: offline, and the image or one of its blobs is not present
            (the message names what is missing); an index has no manifest
            for the platform.
        InvalidArgument: a present manifest is malformed or Docker schema 1.
    """
    started = time.monotonic()
    network = False
    offline = options.offline
    target = _local_target(ref, content, images, by_name=offline or hosts is not None)
    if target is None:
        if offline:
            raise NotFound(f"{ref}: not present locally, and the pull is offline")
        return None
    if not offline and ref.digest is None:
        if hosts is None:
            return None
        from ckfs.remotes.peek import PEEK_DEADLINE, tag_digest

        network = True
        within = PEEK_DEADLINE if options.timeout is None else options.timeout
        if tag_digest(ref, hosts, within=within) != target.digest:
            return None
    try:
        follow = platform_children(options.platform, all_platforms=options.all_platforms)
        report = present(content, ref, target, children=follow)
    except NotFound:
        if offline:
            raise
        return None
    if on_event is not None:
        for blob in report.blobs:
            on_event(blob)
    return _finish(ref, images, report, register, network=network, started=started)


def _finish(
    ref: Reference,
    images: ImageStore,
    report: FetchReport,
    register: bool,
    *,
    network: bool,
    started: float,
) -> PullReport:
    image = _register(images, str(ref), report.target) if register else None
    return PullReport(
        reference=ref,
        target=report.target,
        fetch=report,
        image=image,
        network=network,
        seconds=time.monotonic() - started,
    )


def _register(images: ImageStore, name: str, target: Descriptor) -> Image:
    """Point *name* at *target*; leave it alone when it already does."""
    try:
        current = images.get(name)
    except NotFound:
        pass
    else:
        if current.target == target:
            return current
    return images.put(Image.new(name, target))


def _local_target(
    ref: Reference, content: ContentStore, images: ImageStore, *, by_name: bool
) -> Descriptor | None:
    """The target *ref* names, from local state only; None if unknown here.

    A digest names its blob directly, if present (the media type is read
    from the body, as the registry would have sent it). Without a digest,
    and only when *by_name* (an offline pull; online, a tag may have moved),
    the image store's entry for ``str(ref)`` is used.

    Raises:
        InvalidArgument: the digest names a Docker schema 1 manifest.
    """
    if ref.digest is None:
        if not by_name:
            return None
        try:
            return images.get(str(ref)).target
        except NotFound:
            return None
    if not content.exists(ref.digest):
        return None
    try:
        image = images.get(str(ref))
    except NotFound:
        pass
    else:
        if image.target.digest == ref.digest:
            return image.target
    data = content.read_all(ref.digest, limit=manifests.MAX_MANIFEST_SIZE)
    try:
        body = parse_object(data, str(ref))
    except InvalidArgument:
        return None  # not a manifest or index at all
    media_type = manifests.body_media_type(body, str(ref))
    if media_type is None:
        return None
    return Descriptor(media_type=media_type, digest=ref.digest, size=len(data))
