"""The lazy snapshotter: overlayfs over layers one FUSE process serves from their indexes.

`snapshotters.fuse.snapshotter` is the snapshotter; only the serving
process's modules import pyfuse3, so listing or removing snapshots never
loads it.
"""
