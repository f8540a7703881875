"""Tape copies (seed Table 7.3: weekly copy of the image repository to tape, kept two months).

drive.py: the sequential media (virtual library, real drive); format.py: records and tape files on them;
copy.py: copies, catalogs, media retention, restore from tape. This module opens them from hotvm.yaml.
"""

from __future__ import annotations

from pathlib import Path

from hotvm.config import Config
from hotvm.config_file import load_config
from hotvm.tape.drive import Library, open_library


def open_tape(config: Config | str | Path | None, name: str) -> Library:
    tape = load_config(config).find_tape(name)
    return open_library(tape.name, tape.url)


def media_rows(library: Library, states, catalogs: list[dict]) -> list[dict]:  # noqa: ANN001
    """What `hotvm tape list` shows: per medium its labels, tape files, sets and expiry."""
    from hotvm.tape.copy import copy_expiry, medium_expires

    expiry = copy_expiry(catalogs)
    where: dict[tuple[str, int], str] = {}
    for c in catalogs:
        for s in c["sets"]:
            for i, part in enumerate(s["parts"]):
                cont = f" (part {i + 1}/{len(s['parts'])})" if len(s["parts"]) > 1 else ""
                where[(part["medium"], part["file"])] = f"{s['vm']}/{s['backup_id']}{cont}"
    rows = []
    for st in states:
        until = medium_expires(st, expiry)
        rows.append({
            "medium": st.medium,
            "blank": st.blank,
            "copies": sorted({lab.get("copy_id", "?") for lab in st.labels}),
            "incomplete_copies": sorted({lab.get("copy_id", "?") for lab in st.labels} - set(expiry)),
            "labels": st.labels,
            "files": [{"file": f.number, "kind": f.kind, "set": where.get((st.medium, f.number))}
                      for f in st.files],
            "sets": sorted({v for (m, _), v in where.items() if m == st.medium}),
            "expires": until.isoformat() if until else None,
            "free_bytes": st.remaining * 65536 if st.remaining is not None else None,
        })
    return rows
