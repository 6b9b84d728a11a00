"""``make protos``: the committed Python modules of ckfs's protobuf API.

See `ckfs_protos.generate`; ``python -m ckfs_protos [--check]`` runs it.
"""
