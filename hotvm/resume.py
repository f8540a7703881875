"""Which backup set a new run continues: the VM's newest set if it never completed.

A rerun after a crash, a full target or a killed process resumes that set (its finished disks, volumes
and chunks are already on the target) instead of starting over; `--new` on the command line opts out.
Used by the CLI; flows take the id as their `backup_id` parameter.
"""

from __future__ import annotations

from hotvm.formats.repository import Repository


def unfinished_set_id(sets: list) -> str | None:
    """The id of the newest of `sets` (oldest first) if it is incomplete, else None."""
    return sets[-1].backup_id if sets and not sets[-1].complete else None


def image_resume_id(repo: Repository, vm: str) -> str | None:
    """The unfinished image set of `vm` a new image backup continues, if any."""
    return unfinished_set_id(repo.list_sets(vm))


def files_resume_id(repo: Repository, vm: str) -> str | None:
    """The unfinished file set of `vm` a new file-level backup continues, if any (none without a
    repository yet)."""
    from hotvm.files.filesets import FileSets

    return unfinished_set_id(FileSets(repo).list_sets(vm)) if repo.unlock() else None
