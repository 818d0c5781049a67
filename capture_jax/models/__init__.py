"""Flax modules of CAPTURE."""

from capture_jax.models.capture import CaptureModel, dummy_batch, init_params

__all__ = ['CaptureModel', 'dummy_batch', 'init_params']
