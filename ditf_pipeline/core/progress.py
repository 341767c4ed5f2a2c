"""Progress of the long stages: a bar on a terminal, plain periodic lines in a log file.

tqdm's carriage-return bars turn a SLURM `.out` file into one endless line, so the bar is
drawn only when stderr is a terminal; otherwise one line is printed every `every_s` seconds
or every 10 % (whichever comes first), with done/total, rate and ETA, and one at the end.
Every stage that shows progress goes through `progress()`; `--quiet` (or `--no-progress`)
turns all of it off.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

#: seconds between two lines in a log, at most
EVERY_S = 30.0
#: fraction of the total between two lines in a log, at most
EVERY_FRACTION = 0.1


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Silent:
    """What a disabled progress display is: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(_Silent):
    """Periodic single lines: ``desc: 40/100 (40%) 3.20 img/s, ETA 00:19``."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream: TextIO | None = None,
                 every_s: float = EVERY_S, every_fraction: float = EVERY_FRACTION, clock=time.monotonic) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self._start_done = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        self.step = max(1, int(round(self.total * every_fraction))) if self.total else 1
        self.start = self._last_time = clock()
        self._last_done = self.done
        self._postfix = ""
        self._closed = False
        self._lock = threading.Lock()  # match workers update from several threads

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        text = f"{self.desc}: {self.done}/{self.total}"
        if self.total:
            text += f" ({100.0 * self.done / self.total:.0f}%)"
        text += f" {rate:.2f} {self.unit}/s"
        if self.total and self.done < self.total:
            text += f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else ", ETA ?"
        else:
            text += f", {_duration(elapsed)} elapsed"
        return text + (f" {self._postfix}" if self._postfix else "")

    def _emit(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_time, self._last_done = self.clock(), self.done

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += int(n)
            if self.done - self._last_done >= self.step or self.clock() - self._last_time >= self.every_s:
                if self.done < self.total:
                    self._emit()

    def set_postfix(self, **values) -> None:
        self._postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.done > self._start_done:  # nothing done (all cached): no line
                self._emit()


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
             stream: TextIO | None = None):
    """A progress display with `update(n)`, `set_postfix(**kw)`, `close()` and `with` support:
    a tqdm bar on a terminal, `LineProgress` otherwise, nothing when not `enabled`."""
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, initial=initial, stream=stream)
