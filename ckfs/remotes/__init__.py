"""Where images come from: registries, local archives, and how to fetch from them.

This file stays import-free: the CLI reads `DEFAULT_CONCURRENCY` and the
limits' defaults (blob size, time budget) for its help text without
loading the stores.
"""

import sys

#: Blobs transferred at once: skopeo's and podman's default (``ctr`` sets
#: no limit; Docker and containerd's CRI take 3). With three, an image of
#: four equal layers fetched its last one alone at the end: a cold pull of
#: 234 MB through ckfsd from a local registry took 0.38 s, with six 0.33 s
#: (medians of 8). Six stays polite to a remote registry.
DEFAULT_CONCURRENCY = 6

#: Largest blob a fetch accepts from a descriptor (``--max-blob-size``).
#: Generous: the largest layers seen in the wild (CUDA, ML model images)
#: are a few GiB; a descriptor claiming more than 64 GiB is far more likely
#: a hostile or broken one that would fill the disk before its digest fails.
DEFAULT_MAX_BLOB_SIZE = 64 << 30

#: Every blob's time budget starts at this many seconds: enough for a few
#: connection attempts, token round trips and capped ``Retry-After`` waits,
#: which all come out of the same budget as the transfer itself.
BUDGET_BASE = 120.0

#: ...plus its size at this rate (bytes per second), 100 kB/s (0.8 Mbit/s):
#: a poor but working link still completes a 1 GB layer inside its budget
#: (about 2 h 50 min); a slower one needs ``--timeout``. Stalls and trickles
#: are caught far sooner by the registry client's low-speed limit; the
#: budget bounds everything else (retries times resumes times waits).
BUDGET_MIN_RATE = 100_000


def time_budget(size: int, timeout: float | None = None) -> float:
    """Seconds one blob of *size* bytes may take, or *timeout* when given."""
    if timeout is not None:
        return timeout
    return BUDGET_BASE + size / BUDGET_MIN_RATE


def skip_httpx_cli() -> None:
    """Keep the coming ``import httpx`` from loading httpx's own command-line tool.

    httpx imports its CLI (click, rich, pygments) whenever those are
    installed: ~0.15 s for every command that reaches a registry (pull,
    fetch, a cold mount), and for ckfsd's first pull. A None entry makes
    that one import fail, which httpx handles (its `main` becomes a stub).
    Called just before the registry code is imported, so the CLI's other
    commands see no trace of it.
    """
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
