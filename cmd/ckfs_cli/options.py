"""What several commands share on their command line, defined once.

Click only: importing this costs nothing beyond click itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ckfs_cli.app import App

__all__ = [
    "DEFAULT_SNAPSHOTTER",
    "apply",
    "pass_app",
    "registry_options",
    "snapshotter_option",
]

_F = TypeVar("_F", bound=Callable[..., Any])

#: Hands a command the `App` made by the top-level group.
pass_app = click.make_pass_decorator(App)

#: Until the lazy snapshotter lands, overlayfs is what containerd users expect.
DEFAULT_SNAPSHOTTER = "overlayfs"


def apply(f: _F, options: list[Callable[[Any], Any]]) -> _F:
    """Decorate *f* with *options*, listed in the order ``--help`` shows them."""
    for option in reversed(options):
        f = option(f)
    return f


def snapshotter_option(f: _F) -> _F:
    return click.option(
        "--snapshotter",
        "-s",
        default=DEFAULT_SNAPSHOTTER,
        show_default=True,
        help="Snapshotter: overlayfs or native.",
    )(f)


def registry_options(f: _F) -> _F:
    """Where an image comes from when it is not all present: `pull`, `mount` and the like."""
    return apply(
        f,
        [
            click.option(
                "--plain-http",
                is_flag=True,
                help="Use plain HTTP when no hosts.toml says otherwise.",
            ),
            click.option(
                "--hosts-dir",
                "hosts_dirs",
                multiple=True,
                type=click.Path(file_okay=False, path_type=Path),
                help="certs.d directory with <registry>/hosts.toml (repeatable) "
                "[default: <root>/certs.d, /etc/containerd/certs.d].",
            ),
            click.option(
                "--platform", default=None, help="os/arch[/variant] [default: this host]."
            ),
            click.option("--user", "-u", default=None, metavar="USER:PASS", help="Credentials."),
            click.option(
                "--offline", is_flag=True, help="Never contact the registry; all must be present."
            ),
        ],
    )
