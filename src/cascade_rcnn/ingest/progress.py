"""Rate-limited progress lines for long loops (downloads, extraction, hashing, image checks)."""

from __future__ import annotations

import logging
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """Logs `done/total` with rate and ETA at most every `every_s` seconds, and once at the end.

    unit="bytes" prints MB and MB/s; any other unit prints counts ("images", "files").
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "bytes",
        start: int = 0,
        every_s: float = 5.0,
        logger: logging.Logger | None = None,
    ):
        self.label = label
        self.total = total
        self.unit = unit
        self.done = start
        self._start_done = start
        self._every_s = every_s
        self._log = logger or logging.getLogger("cascade_rcnn.ingest")
        self._t0 = time.monotonic()
        self._last = self._t0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._log.info("%s", self.line())

    def finish(self) -> None:
        self._log.info("%s (done)", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        if self.unit == "bytes":
            done = f"{self.done / 1e6:.1f}"
            total = f"/{self.total / 1e6:.1f}" if self.total else ""
            text = f"{self.label}: {done}{total} MB, {rate / 1e6:.2f} MB/s"
        else:
            total = f"/{self.total}" if self.total else ""
            text = f"{self.label}: {self.done}{total} {self.unit}, {rate:.1f} {self.unit}/s"
        if self.total:
            text += f" ({100.0 * self.done / self.total:.0f}%"
            if rate > 0 and self.done < self.total:
                text += f", ETA {format_duration((self.total - self.done) / rate)}"
            text += ")"
        return text
