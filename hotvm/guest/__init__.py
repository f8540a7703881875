"""The tiny demo guest: a real Linux VM whose disk tells whether a backup of it is a point in time.

Plain Python, no Prefect: the CLI (`hotvm vm ...`), `make demo` and the tests call it directly.
"""

from hotvm.guest.disk import RING, RingReport, make_record, verify_ring
from hotvm.guest.vm import (
    BootCheckResult,
    VMStatus,
    boot_check,
    create_vm,
    delete_vm,
    get_vm,
    list_vms,
    start_vm,
    stop_vm,
    vm_config_entry,
    wait_heartbeat,
    wait_ready,
)

__all__ = [
    "RING",
    "BootCheckResult",
    "RingReport",
    "VMStatus",
    "boot_check",
    "create_vm",
    "delete_vm",
    "get_vm",
    "list_vms",
    "make_record",
    "start_vm",
    "stop_vm",
    "verify_ring",
    "vm_config_entry",
    "wait_heartbeat",
    "wait_ready",
]
