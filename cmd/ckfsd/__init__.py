"""``ckfsd``: the long-lived ckfs process that serves the gRPC API.

One daemon per state root owns the stores and the registry clients, on one
trio loop; the CLI and containerd (through its ``[proxy_plugins]``) talk to
it on a unix socket. The FUSE mount is its own serving process's
(`snapshotters.fuse.process`), which outlives a daemon restart. The pieces:

- `ckfsd.main`: the command line and the config file;
- `ckfsd.listen`: the socket's place: locks, stale sockets, an atomic bind;
- `ckfsd.daemon`: the lifecycle: recover, serve, readiness, signals;
- `ckfsd.recover`: what a killed daemon may have left, cleared at start.
"""
