"""`python -m capture_jax.bench`: see `capture_jax.bench.harness`."""

from capture_jax.bench import harness

if __name__ == '__main__':
  harness.console_main()
