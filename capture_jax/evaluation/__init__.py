"""Retrieval evaluation: search, the official Product1M metrics, baselines, reports.

Modules (imported on demand):

* ``metrics``: ground truth and ``retrieval_id_list.txt`` I/O, official mAP/Prec/mAR.
* ``search``: exact chunked/sharded top-k (JAX) and FAISS IVF/HNSW with recall@k.
* ``baselines``: TF-IDF over titles and mean-region-feature embeddings.
* ``calibration``: those baselines' mAP@R read straight from a Product1M folder (the
  synthetic world's calibration; ``python -m capture_jax.evaluation.calibration``).
* ``instance_merge``: round-robin merge of per-instance ranked lists.
* ``report``: ``report.md``, ``metrics.json`` and the metrics plot.
"""
