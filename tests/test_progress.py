"""Progress: a bar on a terminal, plain lines in a redirected log."""

from __future__ import annotations

import io

from capture_jax import progress


class _Terminal(io.StringIO):

  def isatty(self) -> bool:
    return True


def test_a_log_gets_plain_lines_every_n_units_and_one_at_the_end():
  log = io.StringIO()
  bar = progress.Progress(25, 'pretraining', 'step', log_every=10, stream=log)
  for step in range(25):
    if step == 12:
      bar.set_postfix(loss='1.234')
    bar.update(1)
  bar.close()
  text = log.getvalue()
  assert '\r' not in text
  lines = text.splitlines()
  assert [l.split(':')[1].split()[0] for l in lines] == ['10/25', '20/25', '25/25']
  assert lines[0].startswith('pretraining: 10/25 step') and 'loss=1.234' in lines[1]


def test_no_repeated_last_line_and_nothing_when_disabled():
  log = io.StringIO()
  bar = progress.Progress(20, 'embedding', 'row', log_every=10, stream=log)
  bar.update(20)
  bar.close()
  assert len(log.getvalue().splitlines()) == 1
  quiet = io.StringIO()
  off = progress.Progress(5, 'x', enabled=False, stream=quiet)
  off.update(5)
  off.close()
  assert quiet.getvalue() == ''


def test_a_terminal_gets_a_tqdm_bar():
  tty = _Terminal()
  bar = progress.Progress(3, 'pretraining', 'step', stream=tty)
  bar.update(3)
  bar.close()
  assert '\r' in tty.getvalue() and '3/3' in tty.getvalue()
