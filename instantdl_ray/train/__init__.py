"""Training on Ray Train workers.

Owns: the training loop, validation, early stopping, checkpoints and resume (``loop``) and the
hyperparameter search (``tune``). Imports Ray (it distributes work).
May import: ``config``, ``data``, ``models``, ``losses``, ``tasks``, ``io``, ``errors``, ``_ray``.
"""
