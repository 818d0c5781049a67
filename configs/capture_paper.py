"""CAPTURE at the released sizes (148,192,136 parameters, bert-base-chinese vocab)."""

from capture_jax import config as config_lib


def get_config(arg=None):
  del arg
  return config_lib.base_config()
