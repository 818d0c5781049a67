"""The evaluation and export path: plan -> exports -> rank -> score -> results.

Modules (imported on demand), in the order an evaluation uses them:

* ``keys``: the typed names (``Proposer``, ``ExportKey``, ``Method``) and their labels.
* ``plan``: ``EvalPlan`` (proposers with the headline first, export jobs, report rows).
* ``identity``: an export's identity and what a folder holds (complete, reusable, stale).
* ``embedding``: the jitted, sharded embedding step (also compiled by ``capture_jax.aot``).
* ``export_format``: the on-disk export (sharded ``.npz`` + ``metadata.json``), read and written.
* ``writer``: the shard writer, with multi-host gathering; ``exporting``: one export or many.
* ``search``, ``instance_merge``, ``ranking``: top-k search and every row's ranked lists.
* ``baselines``: TF-IDF over titles and mean-region-feature embeddings.
* ``metrics``: ground truth and ``retrieval_id_list.txt`` I/O, the official mAP/Prec/mAR.
* ``report``, ``results``: ``report.md``, ``metrics.json``, the plot, ``evaluation.json``.
* ``evaluation``: ``evaluate``, the program of ``python -m capture_jax.evaluate``.
* ``calibration``: the baselines' mAP@R read straight from a Product1M folder.
"""
