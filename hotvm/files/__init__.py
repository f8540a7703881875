"""Guest file systems read from disk images and backup sets (pytsk3), and written back through loop mounts.

Read side: blockdev (bytes of a disk) -> volumes (its partitions) -> fs (files). Write side: mount.
docs/files-reading.md says why these libraries and what they cannot read.
"""
