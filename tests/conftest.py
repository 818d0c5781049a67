"""Shared test fixtures. Tests run on CPU; multi-device tests spawn their own processes."""

from __future__ import annotations

import os
from pathlib import Path

# Tests are dominated by XLA compile time on CPU: skip LLVM's expensive optimisations
# (4x faster compiles; still deterministic, but the last bits differ from a default run such
# as `make demo`). Set before JAX starts; subprocesses inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
  ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
  """`../shared` beside the checkout (or $CAPTURE_SHARED), None when absent."""
  candidate = Path(os.environ.get('CAPTURE_SHARED', REPO.parent / 'shared'))
  return candidate if candidate.is_dir() else None


@pytest.fixture
def shared() -> Path:
  path = shared_dir()
  if path is None:
    pytest.skip('../shared is not present beside the checkout')
  return path


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Share compiled programs between tests (several trainer runs compile the same step), in this
  process and in every process a test starts (they inherit the environment): the runs a resume
  test starts and the commands a CLI test runs compile the same step. Multi-process runs opt out
  (`helpers.without_compile_cache`)."""
  from tests.helpers import compile_cache_env  # pylint: disable=import-outside-toplevel

  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  os.environ.update(compile_cache_env())
