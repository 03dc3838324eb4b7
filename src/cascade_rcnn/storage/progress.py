"""One progress reporter for storage transfers and ingest loops: rate-limited log lines with rate and ETA."""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

_log = logging.getLogger("cascade_rcnn.storage")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts `done` out of `total` and logs it at most every `every_s` seconds, and once at the end.

    unit="bytes" prints MB and MB/s; any other unit prints counts ("images", "files"). With `files`
    (a file count) it also counts whole files through file_done(), for tree transfers that move bytes
    of many files. Safe to update from several threads.
    """

    def __init__(
        self,
        label: str,
        total: Optional[int],
        *,
        unit: str = "bytes",
        files: Optional[int] = None,
        start: int = 0,
        every_s: float = 5.0,
        enabled: bool = True,
        quiet_below_s: float = 0.0,
        logger: Optional[logging.Logger] = None,
    ):
        self.label, self.total, self.unit, self.total_files = label, total, unit, files
        self.done = start
        self.files = self.skipped = self.unverified = 0
        self.enabled = enabled
        self._start_done = start
        self._every_s = every_s
        self._quiet_below_s = quiet_below_s  # single-file transfers: no line for the quick ones
        self._log = logger or _log
        self._lock = threading.Lock()
        self.start = self._last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
        self.maybe_log()

    def file_done(self, skipped: bool = False, verified: bool = True) -> None:
        with self._lock:
            self.files += 1
            self.skipped += int(skipped)
            self.unverified += int(not verified)

    def maybe_log(self) -> None:
        now = time.monotonic()
        with self._lock:
            if not self.enabled or now - self._last < self._every_s:
                return
            self._last = now
        self._log.info("%s", self.line())

    def finish(self) -> None:
        if self.enabled and self.elapsed >= self._quiet_below_s:
            self._log.info("%s", self.final_line())

    def _rate(self) -> float:
        return (self.done - self._start_done) / max(self.elapsed, 1e-9)

    def _amount(self, n: float) -> str:
        return f"{n / 1e6:.1f}" if self.unit == "bytes" else f"{n:.0f}"

    def _rate_text(self, rate: float) -> str:
        return f"{rate / 1e6:.2f} MB/s" if self.unit == "bytes" else f"{rate:.1f} {self.unit}/s"

    def _unit(self) -> str:
        return "MB" if self.unit == "bytes" else self.unit

    def line(self) -> str:
        rate = self._rate()
        files = f"{self.files}/{self.total_files} files, " if self.total_files is not None else ""
        total = f"/{self._amount(self.total)}" if self.total else ""
        text = (
            f"{self.label}: {files}{self._amount(self.done)}{total} {self._unit()}, {self._rate_text(rate)}"
        )
        if self.total:
            text += f" ({100.0 * self.done / self.total:.0f}%"
            if rate > 0 and self.done < self.total:
                text += f", ETA {format_duration((self.total - self.done) / rate)}"
            text += ")"
        return text

    def final_line(self) -> str:
        files = ""
        if self.total_files is not None:
            files = f"{self.files - self.skipped} files ({self.skipped} unchanged, skipped), "
        return (
            f"{self.label}: done, {files}{self._amount(self.done)} {self._unit()} in {self.elapsed:.1f} s, "
            f"{self._rate_text(self._rate())}"
        )
