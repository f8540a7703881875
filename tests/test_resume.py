"""Which set a rerun continues (hotvm/resume.py), on a real repository: the newest set of the VM if it
never completed, nothing once it did, and nothing for a target that holds no repository yet."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from test_encryption import backup, config, image_with_pattern, open_repo

from hotvm.formats.repository import new_backup_id
from hotvm.resume import files_resume_id, image_resume_id


def test_a_rerun_resumes_only_the_newest_unfinished_set(tmp_path: Path) -> None:
    assert files_resume_id(open_repo(config(tmp_path / "none")), "web01") is None  # no repository yet
    repo = open_repo(config(tmp_path / "t"))
    backup(repo, image_with_pattern(tmp_path / "disk.raw", 1 << 20), vm="web01")
    assert image_resume_id(repo, "web01") is None  # the newest set is complete: a new run starts afresh

    crashed = new_backup_id(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    repo.mark_started("web01", crashed, "h1")
    assert image_resume_id(repo, "web01") == crashed
    assert image_resume_id(repo, "db01") is None  # another VM's unfinished set is not this VM's
    assert files_resume_id(repo, "web01") is None  # an image set is not a file set
