"""The demo model on the world built from the real dev titles (issue 10).

The world: `python -m capture_jax.data.synthetic --annotations
../shared/product1m/product1m_dev_ossurl_v2.txt --out DATA --preset demo` (the real
dev queries' titles and label sets; gallery, training pairs and test queries are
rendered from those labels). Then the demo's six stages on it:

    python -m capture_jax.demo --config=configs/real_titles.py --workdir=W \
        --config.data.data_dir=DATA --config.data.tfds_dir=TFDS --config.data.vocab_file=DATA/vocab.txt

Everything is `configs/demo.py` except the two fields below, each chosen by
measurement on this world's dev split (docs/BENCHMARKS.md, "Real titles (issue 10)").
Dev mAP@10 of CAPTURE (both, learned proposals) against TF-IDF (64.20): 72.61, 69.52
and 68.27 for seeds 0, 1 and 2 (mean +5.93; issue 10 asks for +5).
"""

import importlib.util
import os


def _demo_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py')
  spec = importlib.util.spec_from_file_location('_capture_demo_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  del arg
  c = _demo_config()
  # 2,000 steps at batch 64 (the demo: 600): what fits the 15-minute budget on the 2-core
  # VM with the proposer and the evaluation of the 2,673 dev queries. Dev mAP@10, both,
  # learned proposals: 66.53 at 600 steps, 69.46 at 2,000.
  c.train.num_steps = 2000
  # The real titles are unlike the synthetic training captions: the text encoder pooler
  # alone retrieves at 51.7 dev mAP@10 (TF-IDF 64.2), the visual one at 70.1, so the
  # text poolers get a quarter of the cosine instead of half (evaluation/embeddings.py).
  c.eval.encoder_text_weight = 0.25
  return c
