"""The unpack engine: plain Python that turns a conda-pack archive into a prefix on node-local disk.

Nothing here imports Jupyter, Tornado or traitlets (an import-linter contract in
``pyproject.toml`` keeps it so); settings arrive as arguments. The layers above — the CLI
(:mod:`kernelprov.cli`) and the Jupyter integration (:mod:`kernelprov.jupyter`) — all go through
:func:`kernelprov.engine.stage.ensure_staged` and :mod:`kernelprov.engine.inventory`.

Modules, from the bottom up:

``formats``      the one table of archive formats: names, file suffixes, magic bytes, detection
``tarstream``    the strict streaming tar reader
``streams``      hashing reader, decompressors, the bounded read-ahead thread
``treewriter``   writes validated members under the staging dir
``extract``      ``extract()`` and ``scan()``: archive -> tree, archive -> counts for a manifest
``relocate``     rewrites conda-pack's prefix records (what ``conda-unpack`` does)
``manifest``     the ``<archive>.manifest.json`` sidecar
``securedir``    private dirs reached through a trusted chain and held open (fd-relative work)
``leases``       which envs running kernels use (flock, or PID + start time)
``cache``        the per-user cache dir: layout, markers, locks, publishing, eviction
``space``        free-space checks, LRU eviction, the size budget, disk-full messages
``image``        squashfs images: copy, mount (squashfuse), unsquashfs, member checks, timeouts
``unpack``       stage a tar/zip archive (extract, verify, relocate, publish)
``image_stage``  check an image's baked mount point, stage it, point that symlink at it
``stage``        ``ensure_staged()``: the story of a start (reuse? lock, stage, publish)
``inventory``    what is staged on this node: find, list, evict, clean (reads never write)
``pack``         pack an env with conda-pack and write its manifest

The package imports nothing at import time so that ``kernelprov unpack`` on the warm path
loads only the modules it needs.
"""
