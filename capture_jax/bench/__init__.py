"""Benchmarks, all in one place; `python -m capture_jax.bench` is the harness.

| module | what it measures |
| --- | --- |
| `harness` | the command: train step, export, and the parts below; appends rows to docs/BENCHMARKS.md |
| `input` | the Grain input pipeline, samples/s per core |
| `search` | exact and FAISS top-100 search at gallery scale |
| `contrastive` | the global-batch ring contrastive loss, memory and time |
"""
