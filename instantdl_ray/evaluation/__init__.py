"""Evaluation of written predictions against the groundtruth.

Owns: the lazy (Dask) pairing of predictions with groundtruth and the per-task metrics written to
``evaluation/`` (``evaluate``), the summable metric states and statistics (``metrics``), and the
figures and HTML report (``report``).
May import: ``io``, ``tasks``, ``errors``, ``registry``.
"""
