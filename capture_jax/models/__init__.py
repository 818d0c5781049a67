"""Flax modules of CAPTURE."""

from capture_jax.models.capture import CaptureModel, init_params

__all__ = ['CaptureModel', 'init_params']
