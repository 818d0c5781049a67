"""A Product1M-like synthetic world, written in the real on-disk formats.

The world has the properties that make Product1M retrieval hard:

* brands of fine-grained products: a product's latent appearance is the sum
  of its brand's latent (products of one brand look alike), its product
  type's and series' latents (shared across products) and a smaller
  product-specific detail;
* region features are a learnable function of that latent: each detector
  region is the latent plus view noise, concatenated with an image-level
  "style" nuisance (lighting, camera), pushed through one fixed random
  two-layer network into feature space (non-negative, like pooled CNN
  features), plus background regions drawn from a bank of clutter latents.
  Raw feature similarity is therefore dominated by style and clutter, which a
  model can learn to ignore but a mean-of-regions baseline cannot;
* weak captions: a title names the brand (Latin name or Chinese alias), some
  but not all of the products (sometimes only their type or series, with
  synonyms), sometimes a product that is not in the image, and marketing
  words that carry no visual information but look like rare, informative
  words to TF-IDF;
* single-product samples (the gallery, part of training) and multi-product
  samples (queries, part of training) of 2 to 7 instances of one brand (as in
  every real dev query), each instance one or more regions.

Neither modality alone identifies the products; together they nearly do. The
generator is deterministic by seed (every sample has its own RNG derived from
seed, split and index) and streams to disk, so a million samples need no more
memory than a thousand.

The modules, in the order they build on each other:

* `words`: the built-in vocabulary (series, product types and synonyms, marketing words);
* `world`: sizes (`Preset`, `PRESETS`), difficulty (`WorldParams`), brands, products,
  latents and the feature network (`make_world`, `region_features`);
* `layout`: one image's detector-like boxes and what each shows (`render_regions`);
* `titles`: weak e-commerce titles (`make_title`);
* `samples`: a split's samples, each from its own RNG (`make_sample`, `iter_split`);
* `writer`: a world's folder: annotation files, features, instance sidecars,
  `synthetic_world.json`, real queries and their held-out split (`generate`,
  `heldout_split`);
* `__main__`: the command, `python -m capture_jax.data.synthetic --out DIR --preset demo`.
"""

from capture_jax.data.synthetic.samples import make_sample
from capture_jax.data.synthetic.titles import make_title
from capture_jax.data.synthetic.world import PRESETS
from capture_jax.data.synthetic.world import World
from capture_jax.data.synthetic.world import Preset
from capture_jax.data.synthetic.world import WorldParams
from capture_jax.data.synthetic.world import make_world
from capture_jax.data.synthetic.writer import generate
from capture_jax.data.synthetic.writer import heldout_split
