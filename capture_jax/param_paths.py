"""Parameter paths as text: the one spelling that sharding rules, optimizer masks and weight
import messages all match against."""

from __future__ import annotations

from typing import Any, Sequence


def path_str(path: Sequence[Any]) -> str:
  """A key path (JAX key-path entries, or plain keys) as `text_stream/layer_0/query/kernel`."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)
