"""Benchmarks, all in one place; `python -m capture_jax.bench` is the harness.

| module | what it measures |
| --- | --- |
| `harness` | the command: train step, export, and the parts below; appends rows to docs/BENCHMARKS.md |
| `input` | the Grain input pipeline, samples/s per core |
| `search` | exact and FAISS top-100 search at gallery scale |
| `contrastive` | the global-batch ring contrastive loss, memory and time |
| `step_profile` | where a train step's time goes: traced ops by pass, model scope and operation |
| `versus_torch` | our train step against the PyTorch peer (`torch_peer`), alternating in one process tree |
| `build` | the streaming dataset build at paper feature sizes (1/N workers, Beam) |
| `feature_dtype` | float16 against float32 features in the host batch |
| `fit_table` | per-device memory, largest batch, FLOPs of a config on TPU/GPU targets, by ahead-of-time compilation |
| `platform_probe` | what installed TPU/GPU plugins cost a command's start on a host without accelerators |
| `torch_peer` | CAPTURE in PyTorch from the reference description, for `versus_torch` only |
"""
