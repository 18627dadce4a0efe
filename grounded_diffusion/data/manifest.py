"""An append-only JSON-lines list of finished samples: what makes long builds resumable.

One line per finished sample, appended with a single ``write`` on an O_APPEND file, so several
ranks may append at once. A build writes a sample's files first (temporary name, then rename) and
its line last; a rerun skips the ids already listed.

Sample ids name files (``samples/<id>.safetensors``, ``overlays/<id>.png``), so every id read
from a list is checked to be a plain name: a list cannot point outside its folder (``../``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from grounded_diffusion.errors import UserError
from grounded_diffusion.files import atomic_write, disk_full_error, is_disk_full

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_sample_id(sample_id: object, where: str) -> str:
    """``sample_id`` if it is a plain file name (letters, digits, '.', '_', '-', not leading)."""
    if not isinstance(sample_id, str) or not SAFE_ID.match(sample_id):
        raise UserError(
            f"{where}: sample id {sample_id!r} is not a plain name (letters, digits, '.', '_' and '-'); ids name "
            "files in their folder, and this one would point elsewhere: delete that line"
        )
    return sample_id


class JsonlManifest:
    """Args:
    path: the list's file.
    check: what is wrong with a parsed record's values (e.g. ``categories`` not a list of
        names), or None; such a line counts as damaged, as one that does not parse.
    """

    def __init__(self, path: str | Path, check: Callable[[dict], str | None] | None = None) -> None:
        self.path = Path(path)
        self.check = check

    def append(self, record: Mapping) -> None:
        line = (json.dumps(dict(record), separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        except OSError as error:
            if is_disk_full(error):  # (a short write leaves a torn last line: repair() drops it)
                raise disk_full_error(self.path, "every sample listed before it is kept") from error
            raise
        finally:
            os.close(fd)

    def repair(self) -> None:
        """Before a build (one process): drop a torn last line (an interrupted append), lines that
        are not a sample's record (damaged), and lines whose id is not a plain name; their samples
        are then built again."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            warnings.warn(f"{self.path}: removed a torn last line ({data[keep:][:60]!r})")
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
        good, bad = [], []
        for number, line in self._lines():
            try:
                good.append(self._record(number, line))
            except UserError:
                bad.append(number)
        if bad:
            warnings.warn(
                f"{self.path}: dropped {len(bad)} damaged lines (line {', '.join(map(str, bad[:5]))}); "
                "their samples are built again"
            )
            self.rewrite(good)

    def _lines(self) -> list[tuple[int, str]]:
        """(number, line) of the complete, non-blank lines; a torn last line (an append cut
        short) is skipped with a warning."""
        text = self.path.read_text(errors="replace")
        lines = text.split("\n")
        if lines[-1].strip():
            warnings.warn(
                f"{self.path}: a torn last line skipped ({lines[-1][:60]!r}); the build's rerun removes it"
            )
        return [(number, line) for number, line in enumerate(lines[:-1], 1) if line.strip()]

    def _record(self, number: int, line: str) -> dict:
        where = f"{self.path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "id" not in record:
            raise UserError(
                f"{where}: the line is not a sample's record ({line[:60]!r}); the list is damaged: rerun the build "
                "that wrote it (it drops the line and remakes that sample), or delete that line"
            )
        check_sample_id(record["id"], where)
        problem = self.check(record) if self.check is not None else None
        if problem:
            raise UserError(
                f"{where}: sample {record['id']}: {problem}; the list is damaged: rerun the build that wrote it (it "
                "drops the line and remakes that sample), or delete that line"
            )
        return record

    def records(self) -> list[dict]:
        """Finished samples in order of completion, one per id (a rewrite replaces the earlier)."""
        if not self.path.exists():
            return []
        records: dict[str, dict] = {}
        for number, line in self._lines():
            record = self._record(number, line)
            records[record["id"]] = record
        return list(records.values())

    def rewrite(self, records: list[dict]) -> None:
        """Replace the list with ``records``, atomically."""
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        atomic_write(self.path, lambda tmp: tmp.write_text(text), kept="the list is as it was")

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.records()}
