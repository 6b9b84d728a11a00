"""Layer debugging: an image's layers, where each file came from, without unpacking.

`image.ImageLayers` opens an image ckfs knows (pulled, or recorded lazily)
as its layers' indexes, bottom first, and reads a file's verified bytes the
way the FUSE server does (local blob, chunk cache, or Range requests).
`merged.Merged` applies a stack of those layers bottom-up and says, for any
path, which layer provides it, which versions it shadows and which layer
deleted it. The CLI (``ckfs layers``, ``which``, ``ls``, ``cat``, ``diff``,
``space``, ``explore``) is a face over these; docs/debugging.md describes it.

Layers are numbered from 1 (bottom) to N (top); paths are index paths (no
leading ``/``, ``""`` the root), made from what users type by `user_path`.
"""

from ckfs.inspect.image import ImageLayers, LayerInfo
from ckfs.inspect.merged import Deletion, Merged, Version, Which, user_path

__all__ = ["Deletion", "ImageLayers", "LayerInfo", "Merged", "Version", "Which", "user_path"]
