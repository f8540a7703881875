"""The backup-set format: chunk store, manifests, image reading, export and restore (see docs/format.md)."""
