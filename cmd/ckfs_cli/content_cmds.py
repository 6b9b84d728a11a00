"""``ckfs content``: list, read, remove and verify blobs."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ckfs.content import Info
    from ckfs.digest import Digest

from ckfs_cli.app import (
    App,
    for_each,
    human_size,
    labels_json,
    labels_text,
    print_json,
    print_table,
)
from ckfs_cli.options import pass_app


@click.group()
def content() -> None:
    """Manage the content-addressed blob store."""


def _parse(digest: str) -> Digest:
    from ckfs.digest import Digest

    return Digest.parse(digest)


@content.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only digests.")
@click.argument("filters", nargs=-1)
@pass_app
def ls(app: App, as_json: bool, quiet: bool, filters: tuple[str, ...]) -> None:
    """List blobs, optionally matching containerd-style FILTERS."""
    infos = sorted(app.content.walk(list(filters)), key=lambda i: i.digest)
    if quiet:
        for i in infos:
            click.echo(i.digest)
        return
    if as_json:
        print_json(
            [
                {
                    "digest": str(i.digest),
                    "size": i.size,
                    "created_at": i.created_at.isoformat(),
                    "updated_at": i.updated_at.isoformat(),
                    "labels": labels_json(i.labels),
                }
                for i in infos
            ]
        )
        return
    now = time.time()
    rows = [
        [
            str(i.digest),
            human_size(i.size),
            _age(now - i.created_at.timestamp()),
            labels_text(i.labels),
        ]
        for i in infos
    ]
    print_table(["DIGEST", "SIZE", "AGE", "LABELS"], rows)


def _age(seconds: float) -> str:
    for unit, span in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= span:
            return f"{int(seconds // span)} {unit}"
    return f"{int(seconds)} seconds"


@content.command("get")
@click.argument("digest")
@pass_app
def get(app: App, digest: str) -> None:
    """Write the blob DIGEST to standard output."""
    with app.content.reader(_parse(digest)) as r:
        import shutil

        shutil.copyfileobj(r, sys.stdout.buffer, 1 << 20)
    sys.stdout.buffer.flush()


@content.command("rm")
@click.argument("digests", nargs=-1, required=True)
@pass_app
def rm(app: App, digests: tuple[str, ...]) -> None:
    """Remove blobs (images that need them become incomplete)."""
    for_each(digests, lambda d: app.content.delete(_parse(d)))


@content.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def verify(app: App, as_json: bool) -> None:
    """Re-hash every blob; report the corrupt ones and exit 1 if any.

    Blobs are hashed two at a time in worker threads (hashing releases the
    GIL), so both cores work.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ckfs.errors import DataLoss

    store = app.state.content
    infos = list(store.walk())

    def check(info: Info) -> str | None:
        try:
            store.verify(info.digest)
        except DataLoss as e:
            return str(e)
        return None

    # A short-lived pool of two for a CPU-bound batch: the CLI has no event
    # loop here, and this is the simplest way to use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(check, infos))
    bad = [(i, r) for i, r in zip(infos, results, strict=True) if r is not None]
    if as_json:
        print_json(
            {
                "checked": len(infos),
                "corrupt": [{"digest": str(i.digest), "error": r} for i, r in bad],
            }
        )
    else:
        for _, r in bad:
            click.echo(f"corrupt: {r}", err=True)
        click.echo(f"{len(infos)} blobs checked, {len(bad)} corrupt")
    if bad:
        raise SystemExit(1)


@content.command("active")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def active(app: App, as_json: bool) -> None:
    """List ingests in progress or left by interrupted transfers (resumable)."""
    statuses = app.content.list_statuses()
    if as_json:
        print_json(
            [
                {
                    "ref": s.ref,
                    "offset": s.offset,
                    "total": s.total,
                    "expected": s.expected,
                    "started_at": s.started_at.isoformat(),
                    "updated_at": s.updated_at.isoformat(),
                }
                for s in statuses
            ]
        )
        return
    rows = [
        [
            s.ref,
            human_size(s.offset),
            human_size(s.total) if s.total else "?",
            str(s.expected or "-"),
        ]
        for s in statuses
    ]
    print_table(["REF", "OFFSET", "TOTAL", "EXPECTED"], rows)


@content.command("abort")
@click.option("--all", "abort_all", is_flag=True, help="Every ingest (see above for held ones).")
@click.argument("refs", nargs=-1)
@pass_app
def abort(app: App, abort_all: bool, refs: tuple[str, ...]) -> None:
    """Remove ingests REFS (see `content active`) and their partial bytes at once.

    What `gc` does for ingests idle longer than its --ingest-expiry, now:
    the next pull of those blobs starts from zero. An ingest a running pull
    or import holds is refused (exit status 1) and kept.
    """
    if abort_all == bool(refs):
        raise click.UsageError("give the REFS to abort, or --all")
    store = app.content
    if abort_all:
        refs = tuple(s.ref for s in store.list_statuses())
    for_each(refs, store.abort)
