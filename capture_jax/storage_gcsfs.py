"""gcsfs's filesystem with the retry bounds of `storage` (`RETRIES`, `MAX_DELAY_S`).

fsspec imports this module the first time a `gs://` path is used (`storage` registers it for
the `gs` and `gcs` protocols), so that a command that never touches a bucket does not import
gcsfs (~0.4 s of every start).
"""

from __future__ import annotations

import asyncio
import functools
import random

import gcsfs
import gcsfs.core
from gcsfs import retry

from capture_jax import storage


def _backoff_s(attempt: int) -> float:
  """The wait before try `attempt` (1 = the first retry): gcsfs's jittered doubling from 1 s,
  capped at `storage.MAX_DELAY_S`."""
  return min(random.random() + 2 ** (attempt - 1), storage.MAX_DELAY_S)


def bound_retries() -> None:
  """gcsfs retries its requests with a decorator fixed at import (6 tries, up to 32 s apart; no
  setting reaches it): its three retried methods are wrapped again, around the undecorated ones,
  with `storage.RETRIES` and `storage.MAX_DELAY_S` (read at each call: tests lower them). What is
  retried is gcsfs's own choice (`gcsfs.retry.is_retriable`: 5xx, 429, resets, timeouts); 404
  never is."""
  errors = (
      retry.HttpError,
      retry.requests.exceptions.RequestException,
      retry.google.auth.exceptions.GoogleAuthError,
      retry.ChecksumError,
      retry.aiohttp.client_exceptions.ClientError,
  )

  def bounded(request):
    @functools.wraps(request)
    async def call(*args, **kwargs):
      tries = max(1, storage.RETRIES)
      for attempt in range(tries):
        if attempt:
          await asyncio.sleep(_backoff_s(attempt))
        try:
          return await request(*args, **kwargs)
        except errors as e:
          if attempt == tries - 1 or getattr(e, 'code', getattr(e, 'status', None)) == 404:
            raise
          if not retry.is_retriable(e):
            raise
      raise AssertionError('unreachable')

    call.bounded_by_capture = True
    return call

  # The base class (gcsfs's experimental subclass, the default `gcsfs.GCSFileSystem`, calls it).
  cls = gcsfs.core.GCSFileSystem
  for name in ('_request', '_get_file_request', '_get_file_concurrent'):
    method = cls.__dict__[name]
    if not getattr(method, 'bounded_by_capture', False):
      setattr(cls, name, bounded(method.__wrapped__))


bound_retries()

GCSFileSystem = gcsfs.GCSFileSystem
