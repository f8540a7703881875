"""nbdkit Python plugin: a backup set's disks, read-only, one NBD export per disk (export name = device).

Started by hotvm.instant.export as `nbdkit --unix SOCK -r python nbd_plugin.py path=... bundle_fd=N
log_dir=DIR`. It runs in nbdkit's embedded interpreter (Debian's python3), so it puts hotvm's own import
paths (`path=`, the venv's site-packages and hotvm's source root) first. Everything it needs, secrets
included, arrives as JSON on the inherited pipe `bundle_fd`, read once at start and closed: nothing secret
is in its command line or environment. The work itself is hotvm.instant.chunks.ChunkSource.
"""

import errno
import json
import os
import sys
from pathlib import Path

import nbdkit

API_VERSION = 2

_params: dict = {}
_bundle: dict = {}
_source = None


def config(key, value):  # noqa: ANN001, ANN201
    _params[key] = value


def config_complete():  # noqa: ANN201
    for entry in reversed(_params.get("path", "").split(":")):
        if entry:
            sys.path.insert(0, entry)
    with os.fdopen(int(_params["bundle_fd"]), "rb") as pipe:
        _bundle.update(json.loads(pipe.read()))
    if tuple(_bundle["python"]) != tuple(sys.version_info[:2]):
        raise RuntimeError(
            f"nbdkit's python is {sys.version_info[0]}.{sys.version_info[1]} but hotvm runs on "
            f"{_bundle['python'][0]}.{_bundle['python'][1]}: their compiled modules differ"
        )
    import hotvm.instant.chunks  # noqa: F401 - fail at start, not at the first read


def thread_model():  # noqa: ANN201
    return nbdkit.THREAD_MODEL_PARALLEL


def _get_source():  # noqa: ANN202
    global _source
    if _source is None:
        from hotvm.instant.chunks import open_source

        _source = open_source(_bundle, Path(_params["log_dir"]))
    return _source


def open(readonly):  # noqa: A001, ANN001, ANN201
    name = nbdkit.export_name()
    source = _get_source()
    if name not in source.disks:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no disk {name!r} in this backup set")
    return name


def get_size(h):  # noqa: ANN001, ANN201
    return _get_source().size(h)


def can_write(h):  # noqa: ANN001, ANN201
    return False


def can_multi_conn(h):  # noqa: ANN001, ANN201
    return True


def can_cache(h):  # noqa: ANN001, ANN201
    return nbdkit.CACHE_NONE


def can_extents(h):  # noqa: ANN001, ANN201
    return True


def extents(h, count, offset, flags):  # noqa: ANN001, ANN201
    # The chunk index as a sparse map. An absent (all-zero) chunk is reported as a hole *without* the
    # zero flag: QEMU then counts it as unallocated, so block-stream skips it instead of copying zeros,
    # and once the backing is dropped the overlay reads it as zero, which it is (docs/instant.md).
    hole = nbdkit.EXTENT_HOLE | (nbdkit.EXTENT_ZERO if _bundle.get("zero_flag") else 0)
    return [(o, n, hole if z else 0) for o, n, z in _get_source().extents(h, offset, count)]


def pread(h, buf, offset, flags):  # noqa: ANN001, ANN201
    try:
        buf[:] = _get_source().read(h, offset, len(buf))
    except Exception as exc:
        nbdkit.set_error(errno.EIO)
        nbdkit.debug(f"read of {h} at {offset}: {exc}")
        raise
