"""Where images come from: registries, local archives, and how to fetch from them.

This file stays import-free: the CLI reads `DEFAULT_CONCURRENCY` for its
help text without loading the stores.
"""

#: Blobs transferred at once. Three keeps a fast local link busy while one
#: blob is being committed (fsync) and stays polite to a remote registry;
#: containerd's default is the same.
DEFAULT_CONCURRENCY = 3
