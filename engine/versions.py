"""A bank's versions: every change writes a new version and keeps the previous ones.

    plaza.bank                 the live bank, which engines load and hot-reload
    plaza.bank.history/
        v0001.bank ...         every version, whole
        audit.jsonl            who changed what, when, with which frames and scores

The live file is replaced by rename, so an engine never reads half a bank. A lock file
serialises writers (two operators clicking at once).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .bank import ReferenceBank
from .errors import BankError


@dataclass(frozen=True)
class Version:
    number: int
    ts: float
    action: str  # built, not_anomaly, revert
    user: str
    frames: int  # reference frames in this version
    detail: dict

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.ts)) if self.ts else "?"
        extra = ", ".join(f"{k}={v}" for k, v in self.detail.items() if k in ("to", "event_id", "added", "camera"))
        return f"v{self.number}  {when}  {self.action:<12} {self.user or '-':<12} {self.frames} frames  {extra}".rstrip()


class BankHistory:
    def __init__(self, bank_path: str | Path):
        self.path = Path(bank_path)
        self.dir = self.path.with_name(self.path.name + ".history")
        self.audit = self.dir / "audit.jsonl"

    def file_of(self, number: int) -> Path:
        return self.dir / f"v{int(number):04d}.bank"

    def current(self) -> int:
        """The live bank's version (banks written before versions existed are version 1)."""
        return ReferenceBank.read_summary(self.path).version

    def versions(self) -> list[Version]:
        """Every recorded version, oldest first; the live bank's own record when none is."""
        records = {}
        if self.audit.is_file():
            for line in self.audit.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    records[int(rec["version"])] = Version(int(rec["version"]), float(rec.get("ts", 0)),
                                                           str(rec.get("action", "")), str(rec.get("user", "")),
                                                           int(rec.get("frames", 0)), dict(rec.get("detail", {})))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line: the rest of the history still reads
        if not records:
            live = ReferenceBank.read_summary(self.path)
            records[live.version] = Version(live.version, 0.0, "built", "", live.frames, {})
        return [records[k] for k in sorted(records)]

    def load(self, number: int, device: str = "cpu") -> ReferenceBank:
        path = self.file_of(number)
        if not path.is_file():
            if number == self.current():
                return ReferenceBank.load(self.path, device)
            known = ", ".join(f"v{v.number}" for v in self.versions())
            raise BankError(f"{self.path}: no version {number} in {self.dir} (known: {known})")
        return ReferenceBank.load(path, device)

    def commit(self, bank: ReferenceBank, action: str, user: str = "", detail: dict | None = None) -> int:
        """Write `bank` as the next version and make it live; returns its number."""
        with self._locked():
            current = self.current()
            self._archive(current)
            number = max([current, *(v.number for v in self.versions())]) + 1
            bank.as_version(number)
            bank.save(self.file_of(number))
            tmp = self.path.with_name(self.path.name + ".tmp")
            shutil.copyfile(self.file_of(number), tmp)
            os.replace(tmp, self.path)  # engines reload a complete file or nothing
            self._record(number, action, user, len(bank), detail or {})
            return number

    def revert(self, number: int, user: str = "") -> int:
        """Make an earlier version live again, as a new version: a revert can itself be undone."""
        bank = self.load(number)
        return self.commit(bank, "revert", user, {"to": int(number)})

    def _archive(self, current: int) -> None:
        """Keep the live bank as its version before it is replaced (the first change of a bank)."""
        if not self.file_of(current).is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.file_of(current).with_suffix(".tmp")
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, self.file_of(current))
            if not self.audit.is_file():
                live = ReferenceBank.read_summary(self.path)
                self._record(current, "built", "", live.frames, {}, ts=os.path.getmtime(self.path))

    def _record(self, number: int, action: str, user: str, frames: int, detail: dict, ts: float | None = None) -> None:
        rec = {"version": number, "ts": time.time() if ts is None else ts, "action": action, "user": user,
               "frames": frames, "detail": detail}
        with self.audit.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, allow_nan=False) + "\n")

    @contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
