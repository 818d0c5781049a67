"""Product-instance proposals: which regions of a sample are which product instance.

Instance-level retrieval queries the gallery once per product instance of a
multi-product sample. Real data has no instance sidecar, so the instances are
proposed from the detector regions (boxes + features + image size):

* `learned`: a small Flax model (pairwise same-instance affinity and
  objectness over a sample's regions, `model.py`) trained on copy-and-paste
  pseudo-labels (`compose.py`: single-product gallery samples pasted into one
  canvas; each donor's regions one pseudo-instance), grouped by
  `model.group_regions`. Trained with
  `python -m capture_jax.instances train --config=... --workdir=...`.
* `boxes`: training-free, from box geometry (`geometry.propose_boxes`).
* `oracle`: the generator's `instances_{split}.jsonl` sidecar, an upper bound.

API for export / evaluation:

    from capture_jax import instances
    method = instances.resolve_method(config.eval.instances or None, workdir)
    # (None -> default_method(workdir): 'learned' if trained there, else 'boxes')
    inst = instances.propose_split(config, 'dev', method, workdir)
    # item_id -> [formats.Instance(label, regions)], the sidecar's type:
    it = eval_input.make_instance_eval_iterator(config, 'dev', instances=inst, ...)

Proposal quality against a sidecar: `proposal_quality`, or for all proposers
with their proposals files written: `evaluate_proposers` /
`python -m capture_jax.instances propose --config=... --workdir=... --split=dev`.

The learned proposer groups regions only on confident affinity
(`instances.affinity_threshold=0.8`, chosen on the demo world's dev split; test
held out): pasted instances differ in lighting as well as in product, real
instances of one photo do not, so pseudo-trained affinities are over-confident
between neighbouring products of one image, and a lower threshold over-merges.
Proposal quality of each proposer, and with another seed and another threshold:
docs/BENCHMARKS.md, section "Instance proposals (`capture_jax.instances`) on the
demo world".
"""

from capture_jax.instances.geometry import propose_boxes
from capture_jax.instances.proposals import METHODS
from capture_jax.instances.proposals import Proposal
from capture_jax.instances.proposals import format_proposals
from capture_jax.instances.proposals import proposal_quality
from capture_jax.instances.proposals import proposals_filename
from capture_jax.instances.proposals import quality_table
from capture_jax.instances.proposals import write_proposals
from capture_jax.instances.propose import default_method
from capture_jax.instances.propose import evaluate_proposers
from capture_jax.instances.propose import propose_records
from capture_jax.instances.propose import propose_split
from capture_jax.instances.propose import proposals_path
from capture_jax.instances.propose import region_counts
from capture_jax.instances.propose import resolve_method
from capture_jax.instances.propose import sidecar_quality
from capture_jax.instances.trainer import IncompatibleProposerError
from capture_jax.instances.trainer import LearnedProposer
from capture_jax.instances.trainer import checkpoint_dir
from capture_jax.instances.trainer import has_trained_proposer
from capture_jax.instances.trainer import latest_proposer_step
from capture_jax.instances.trainer import proposer_dir
from capture_jax.instances.trainer import train
