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

Measured on the demo world (`python -m capture_jax.data.synthetic --preset
demo`, seed 0; proposer trained with configs/demo.py's defaults, 400 steps,
~3 min on a busy 2-core CPU); a proposal matches an instance at region-set
IoU >= 0.5. Thresholds (`instances.affinity_threshold=0.8`) were chosen on
dev; test is held out:

    split  proposer                recall  precision  proposals/sample  bg assigned
    dev    boxes                   0.907   0.594      4.47              0.999
    dev    learned                 0.967   0.854      3.32              0.490
    dev    oracle (upper bound)    1.000   1.000      2.93              0.000
    test   boxes                   0.913   0.607      4.61              1.000
    test   learned                 0.954   0.843      3.47              0.513
    test   oracle (upper bound)    1.000   1.000      3.07              0.000

A second training seed (`--config.seed=1`, stopped at step 200 and resumed)
gives dev recall 0.937, precision 0.837, background assigned 0.514.
With `affinity_threshold=0.5` the learned proposer over-merges (dev recall
0.83-0.88): pasted instances differ in lighting as well as in product, real
instances of one photo do not, so pseudo-trained affinities are
over-confident between neighbouring products of one image.
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
