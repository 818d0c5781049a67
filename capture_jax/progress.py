"""Progress of long loops: a tqdm bar on a terminal, plain lines in a log.

A redirected run (`make demo > log`, SLURM, a pod's log collector) gets one
plain line every `log_every` units and a last one at the end, instead of
tqdm's carriage-return frames, which make a log file one huge line that
`grep` calls binary.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def interactive(stream: TextIO | None = None) -> bool:
  """Whether `stream` (default stderr, where tqdm draws) is a terminal."""
  stream = stream or sys.stderr
  return bool(getattr(stream, 'isatty', lambda: False)())


class Progress:
  """`update(n)`, `set_postfix(**values)` and `close()` of a tqdm bar, drawn as a bar on a
  terminal and as plain lines otherwise (or not at all with `enabled=False`)."""

  def __init__(
      self,
      total: int,
      desc: str,
      unit: str = 'it',
      *,
      enabled: bool = True,
      log_every: int | None = None,
      stream: TextIO | None = None,
  ):
    self.total, self.desc, self.unit = int(total), desc, unit
    self._stream = stream or sys.stderr
    self._bar = None
    self._lines = enabled and not interactive(self._stream)
    if enabled and not self._lines:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel

      self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=self._stream)
    # About ten lines over the loop unless told otherwise.
    self._log_every = max(1, int(log_every or -(-self.total // 10) or 1))
    self._done = 0
    self._next_line = self._log_every
    self._postfix: dict[str, Any] = {}
    self._start = time.perf_counter()

  def set_postfix(self, **values: Any) -> None:
    self._postfix = values
    if self._bar is not None:
      self._bar.set_postfix(**values)

  def update(self, n: int = 1) -> None:
    self._done += n
    if self._bar is not None:
      self._bar.update(n)
    elif self._lines and self._done >= self._next_line:
      self._line()
      while self._next_line <= self._done:
        self._next_line += self._log_every

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._lines and self._done and self._done != self._last_line_at:
      self._line()

  _last_line_at = 0

  def _line(self) -> None:
    elapsed = time.perf_counter() - self._start
    rate = f', {self._done / elapsed:.2f} {self.unit}/s' if elapsed > 0 else ''
    extra = ''.join(f', {k}={v}' for k, v in self._postfix.items())
    print(
        f'{self.desc}: {self._done}/{self.total} {self.unit}{rate}{extra}',
        file=self._stream,
        flush=True,
    )
    self._last_line_at = self._done
