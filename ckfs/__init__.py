"""ckfs: container image names to root filesystems.

The library is usable without the CLI: `ckfs.content`, `ckfs.images`,
`ckfs.metadata`, `ckfs.remotes` and friends each hold one concept.
"""

__version__ = "0.1.0"
