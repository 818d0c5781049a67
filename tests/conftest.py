"""Shared test fixtures. Tests run on CPU; multi-device tests spawn their own processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
