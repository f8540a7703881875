"""Made tests/data/format2-repo with the format-2 code (commit ced47f1, before manifest format 3): one VM,
one set, a 12 MiB raw disk. Kept to show how; it refuses to run with later code."""
import datetime as dt
import hashlib
import shutil
import sys
from pathlib import Path

from hotvm.config import TargetConfig
from hotvm.formats.export import export_image
from hotvm.formats.manifest import MANIFEST_FORMAT, Manifest
from hotvm.formats.repository import Repository
from targets import open_target

assert MANIFEST_FORMAT == 2
out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
image = Path("/tmp/incr/f2disk.raw")
MiB = 1 << 20
data = bytearray(12 * MiB)
for i in range(0, 3 * MiB, 4096):       # chunk 0: a compressible pattern
    data[i:i + 4096] = bytes([(i // 4096) % 251]) * 4096
data[5 * MiB:5 * MiB + 256 * 1024] = b"hotvm format 2\n" * (256 * 1024 // 15) + b"x" * (256 * 1024 % 15)
data[9 * MiB:12 * MiB] = b"\xcd" * (3 * MiB)
image.write_bytes(data)
repo = Repository(open_target(TargetConfig(name="f2", url=f"file://{out}")), remember=False)
repo.ensure()
when = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
bid = "20261101T080000Z-f2f2"
repo.mark_started("old-vm", bid, "h1")
record = export_image(repo, device="vda", image=str(image), fmt="raw", frozen_at=when)
repo.write_disk_record("old-vm", bid, record)
repo.commit_manifest(Manifest(backup_id=bid, vm="old-vm", host="h1", driver="qemu", disks=[record],
                              started_at=when, completed_at=when + dt.timedelta(minutes=1)))
print(hashlib.sha256(data).hexdigest())
