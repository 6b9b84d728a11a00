"""Stop what `ckfs mount` started in the background for a state root.

`scripts/demo.sh` runs it on exit: the ckfsd serving the root, then the FUSE
server, each stopped by the PID its lock or pid file names
(`ckfs.client.stop_daemon`, `snapshotters.fuse.process.stop_server`).

Usage: python scripts/stop-background.py ROOT
"""

from __future__ import annotations

import sys
from pathlib import Path

from ckfs.client import stop_daemon
from snapshotters.fuse.process import stop_server

if __name__ == "__main__":
    root = Path(sys.argv[1])
    stop_daemon(root)
    stop_server(root)
