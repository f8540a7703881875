"""The shared options (--config, --target, --json, --verbose) work before the subcommand, as people type
them for git, restic and borg, and after it; one given after the subcommand wins."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import hotvm
from test_encryption import backup, config, image_with_pattern, open_repo


def test_shared_options_before_or_after_the_subcommand_give_the_same_result(tmp_path: Path) -> None:
    backup(open_repo(config(tmp_path / "b")), image_with_pattern(tmp_path / "disk.raw", 1 << 20), vm="web01")
    cfg = tmp_path / "hotvm.yaml"
    cfg.write_text(
        f"hosts: [{{name: h1}}]\ntargets:\n  - name: a\n    url: file://{tmp_path}/a\n"
        f"  - name: b\n    url: file://{tmp_path}/b\n"
    )

    before = hotvm("--config", str(cfg), "--json", "--target", "b", "list").stdout
    after = hotvm("list", "--config", str(cfg), "--json", "--target", "b").stdout
    assert before == after
    assert [(r["vm"], r["complete"]) for r in json.loads(before)] == [("web01", True)]

    # given on both sides, the subcommand's own option wins; short forms and the mixed order work too
    wins = hotvm("-c", str(tmp_path / "missing.yaml"), "-t", "a", "--json", "list", "-c", str(cfg), "-t", "b")
    assert wins.stdout == before
    group = hotvm("-c", str(cfg), "--json", "files", "catalog", "-t", "a").stdout
    assert json.loads(group)["sets"] == 0  # reaches a command of a sub-group (target a has no file sets)

    # a bad global option fails as the subcommand's would: one line naming it, exit 2
    bad = hotvm("--config", str(tmp_path / "missing.yaml"), "list", check=False)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr and "Traceback" not in bad.stderr
