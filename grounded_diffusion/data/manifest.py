"""An append-only JSON-lines list of finished samples: what makes long builds resumable.

One line per finished sample, appended with a single ``write`` on an O_APPEND file, so several
ranks may append at once. A build writes a sample's files first (temporary name, then rename) and
its line last; a rerun skips the ids already listed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from grounded_diffusion.errors import UserError


class JsonlManifest:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: Mapping) -> None:
        line = (json.dumps(dict(record), separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def repair(self) -> None:
        """Drop a torn last line (an interrupted append), so that appends start on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            warnings.warn(f"{self.path}: removed a torn last line ({data[keep:][:60]!r})")
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)

    def records(self) -> list[dict]:
        """Finished samples in order of completion, one per id (a rewrite replaces the earlier)."""
        if not self.path.exists():
            return []
        records: dict[str, dict] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{self.path}:{number}: unreadable line skipped")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise UserError(
                    f"{self.path}:{number}: the line has no sample id ({line[:60]!r}); delete that line "
                    "(rerunning the build that wrote this list remakes the sample)"
                )
            records[record["id"]] = record
        return list(records.values())

    def rewrite(self, records: list[dict]) -> None:
        """Replace the list with ``records``, atomically."""
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        os.replace(tmp, self.path)

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.records()}
