"""The typed names of an evaluation: proposers, exports and report rows.

Nothing in `capture_jax.retrieval` parses a name back: an export is an
`ExportKey`, a row of the report a `Method`, and each has a `.label` for
what a person reads (the report, `evaluation.json`). The only text that is
read back is an export's `proposer` field on disk (`Proposer.from_tag`),
because it is part of the export format.
"""

from __future__ import annotations

import dataclasses
import re

ROLES = ('gallery', 'queries', 'instances')  # what an export holds, in an evaluation
WEIGHTS = ('checkpoint', 'random')  # a checkpoint's, or the random initialisation (config seed)

# How each proposer's instance queries are named in the report; the oracle is the synthetic
# world's own grouping, which real data does not have: always marked as an upper bound.
PROPOSER_LABELS = {
    'learned': 'learned proposals',
    'boxes': 'box proposals',
    'oracle': 'oracle instances, upper bound',
}

TFIDF_LABEL = 'TF-IDF over titles (text only)'
MEAN_REGION_LABEL = 'Mean region feature (visual only)'
BASELINE_LABELS = {'tfidf': TFIDF_LABEL, 'mean_region': MEAN_REGION_LABEL}


@dataclasses.dataclass(frozen=True)
class Proposer:
  """What grouped a sample's regions into product instances (`capture_jax.instances`).

  Attributes:
    name: 'learned', 'boxes' or 'oracle'.
    step: the learned proposer's checkpoint step (a retrained proposer groups regions
      otherwise: its exports are other exports); None for the others.
  """

  name: str
  step: int | None = None

  def __post_init__(self):
    if self.name not in PROPOSER_LABELS:
      raise ValueError(f'unknown proposer {self.name!r}; expected one of {tuple(PROPOSER_LABELS)}')

  @property
  def tag(self) -> str:
    """The export format's `proposer` field and folder suffix: 'boxes', 'learned-400'."""
    return self.name if self.step is None else f'{self.name}-{self.step}'

  @classmethod
  def from_tag(cls, tag: str) -> Proposer:
    """The proposer of an export's `proposer` field (`tag`)."""
    match = re.fullmatch(r'([a-z]+)(?:-(\d+))?', tag or '')
    if not match:
      raise ValueError(f'an export names its proposer {tag!r}; expected e.g. boxes or learned-400')
    return cls(match[1], int(match[2]) if match[2] else None)

  @property
  def label(self) -> str:
    return PROPOSER_LABELS[self.name]


@dataclasses.dataclass(frozen=True)
class ExportKey:
  """One export an evaluation reads: its role, its proposer (instance rows) and its weights."""

  role: str
  proposer: Proposer | None = None
  weights: str = 'checkpoint'

  def __post_init__(self):
    if self.role not in ROLES or self.weights not in WEIGHTS:
      raise ValueError(f'bad export key {self.role!r}, {self.weights!r}')
    if (self.role == 'instances') != (self.proposer is not None):
      raise ValueError('an export of instance rows, and only that, names its proposer')

  @property
  def rows(self) -> str:
    """'samples' (one row per sample) or 'instances' (one per product instance)."""
    return 'instances' if self.role == 'instances' else 'samples'

  @property
  def label(self) -> str:
    """'gallery', 'instances learned', 'queries random weights', ..."""
    name = self.role + (f' {self.proposer.name}' if self.proposer else '')
    return name + (' random weights' if self.weights == 'random' else '')


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the report: the model's lists in a query mode, or a baseline's.

  Attributes:
    source: 'model' (CAPTURE) or a baseline: 'tfidf', 'mean_region'.
    mode: the model's query mode ('whole', 'instances', 'both'; `instance_merge`).
    proposer: the instance queries' proposer (modes other than 'whole').
    weights: 'checkpoint' or 'random' (the model).
  """

  source: str = 'model'
  mode: str = 'whole'
  proposer: Proposer | None = None
  weights: str = 'checkpoint'

  def __post_init__(self):
    if self.source != 'model' and self.source not in BASELINE_LABELS:
      raise ValueError(f'unknown method source {self.source!r}')
    if self.source == 'model' and (self.mode == 'whole') != (self.proposer is None):
      raise ValueError(f'the {self.mode!r} query mode and a proposer go together')

  @property
  def label(self) -> str:
    """'CAPTURE (both, learned proposals)', 'CAPTURE, random weights (whole)', 'TF-IDF ...'."""
    if self.source != 'model':
      return BASELINE_LABELS[self.source]
    where = f', {self.proposer.label}' if self.proposer else ''
    weights = ', random weights' if self.weights == 'random' else ''
    return f'CAPTURE{weights} ({self.mode}{where})'

  @property
  def slug(self) -> str:
    """The label as a file name: its ranked lists are `ranked_lists/{slug}.txt`."""
    return re.sub(r'[^a-z0-9]+', '_', self.label.lower()).strip('_')

  @property
  def export(self) -> ExportKey | None:
    """The export of this method's instance queries (None without instance queries)."""
    if self.source != 'model' or self.proposer is None:
      return None
    return ExportKey('instances', self.proposer, self.weights)
