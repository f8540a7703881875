"""The guest's two busybox shell scripts: `/init` and the ring writer.

The writer is a separate script taking the device as an argument so tests can run it on the host against
a plain file (no QEMU, no root). Its record format must match `hotvm.guest.disk.make_record`.
"""

from __future__ import annotations

from hotvm.guest.disk import BLOCK, RING

DEFAULT_INTERVAL = 0.2  # seconds between records: ~4/s under TCG, enough to see the ring move
WRITER_PATH = "/bin/hotvm-writer"

WRITER = r"""#!/bin/sh
# hotvm demo writer: a ring of self-checking records at the start of a disk (see hotvm/guest/disk.py).
# usage: hotvm-writer DEVICE [CONSOLE] [INTERVAL]     env HOTVM_TMP: scratch dir (default /tmp)
DEV=${1:-/dev/vda}
OUT=${2:-/dev/ttyS0}
INTERVAL=${3:-@INTERVAL@}
RING=@RING@
BS=@BLOCK@
T=${HOTVM_TMP:-/tmp}/hotvm-writer
mkdir -p "$T/fill" || { echo "HOTVM-ERROR cannot create $T" >> "$OUT"; exit 1; }
IFLAG=; OFLAG=
if [ -b "$DEV" ]; then IFLAG=iflag=direct; OFLAG=oflag=direct; fi

# record SEQ FILE: the 4 KiB record of SEQ (header line, then a fill byte that depends on SEQ)
record() {
    hdr="HOTVMREC $1 $1"
    f=$((128 + $1 % 127))
    [ -f "$T/fill/$f" ] || head -c $BS /dev/zero | tr '\000' "\\$(printf %o $f)" > "$T/fill/$f"
    { printf '%s\n' "$hdr"; head -c $((BS - ${#hdr} - 1)) "$T/fill/$f"; } > "$2"
}

say() { echo "$*" >> "$OUT"; }

# Resume after the newest *complete* record: a torn block (crash mid-write) is simply rewritten.
last=0
for s in $(dd if="$DEV" bs=$BS count=$RING $IFLAG 2>/dev/null | strings |
           awk '$1 == "HOTVMREC" && $2 == $3 && $2 ~ /^[0-9]+$/ { print $2 }' | sort -rn); do
    record "$s" "$T/check"
    if dd if="$DEV" bs=$BS skip=$((s % RING)) count=1 $IFLAG 2>/dev/null | cmp -s - "$T/check"; then
        last=$s
        break
    fi
done
say "HOTVM-READY last=$last"

n=$((last + 1))
next=0
while :; do
    record "$n" "$T/rec"
    if ! dd if="$T/rec" of="$DEV" bs=$BS seek=$((n % RING)) count=1 conv=notrunc,fsync $OFLAG 2>/dev/null
    then
        say "HOTVM-ERROR write seq=$n failed"
        sleep 1
        continue
    fi
    read -r up _ < /proc/uptime
    now=${up%.*}
    if [ "$now" -ge "$next" ]; then
        say "HOTVM-HEARTBEAT seq=$n"
        next=$((now + 1))
    fi
    n=$((n + 1))
    sleep "$INTERVAL"
done
"""

INIT = r"""#!/bin/busybox sh
# hotvm demo guest /init: load virtio-blk, then hand over to the ring writer on /dev/vda.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "HOTVM-ERROR insmod $m failed" > /dev/ttyS0
done
interval=@INTERVAL@
for w in $(cat /proc/cmdline); do
    case "$w" in hotvm.interval=*) interval=${w#hotvm.interval=} ;; esac
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then
        echo "HOTVM-ERROR no /dev/vda after 30 s" > /dev/ttyS0
        poweroff -f
    fi
    sleep 0.1
done
exec sh @WRITER@ /dev/vda /dev/ttyS0 "$interval"
"""


def writer_script(interval: float = DEFAULT_INTERVAL) -> str:
    return (
        WRITER.replace("@RING@", str(RING))
        .replace("@BLOCK@", str(BLOCK))
        .replace("@INTERVAL@", _num(interval))
    )


def init_script(modules: list[str], interval: float = DEFAULT_INTERVAL) -> str:
    """`modules`: names in load order (each at /lib/modules/<name>.ko in the initramfs)."""
    return (
        INIT.replace("@MODULES@", " ".join(modules))
        .replace("@INTERVAL@", _num(interval))
        .replace("@WRITER@", WRITER_PATH)
    )


def _num(value: float) -> str:
    return f"{value:g}"
