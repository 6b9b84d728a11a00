"""Layer archives: decompressing a layer blob and applying it to a directory.

The public surface is small: `open_layer` for the uncompressed stream,
`apply_layer` with its `ApplyOptions` and `ApplyResult`. The modules behind
it are `compression`, `apply`, `entry` (what one tar entry means, shared
with the lazy layer indexes), `lowers` (overlay lowers: lookups and
copy-up), `secure` (chrooted path resolution) and `whiteouts`.
"""

from ckfs.archive.apply import DEFAULT_MAX_ENTRY_SIZE, ApplyOptions, ApplyResult, apply_layer
from ckfs.archive.compression import open_layer

__all__ = ["DEFAULT_MAX_ENTRY_SIZE", "ApplyOptions", "ApplyResult", "apply_layer", "open_layer"]
