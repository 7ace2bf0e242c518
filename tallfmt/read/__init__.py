"""The read side: :class:`~tallfmt.read.archive.Archive` over one file or a sharded folder, task
decodes and merges. It imports nothing of the write side."""
