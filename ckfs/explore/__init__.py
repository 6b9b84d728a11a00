"""``ckfs explore``: an image's layers, provenance, changes and wasted space in a terminal UI.

`app.ExploreApp` is the textual application; `model.Model` answers its
questions from the layers' indexes (`ckfs.inspect`); `portal.TrioPortal`
runs those trio calls on textual's asyncio loop; `preview` turns a file's
head into what the preview pane shows. Importing this package loads
textual, so only ``ckfs explore`` imports it.
"""
