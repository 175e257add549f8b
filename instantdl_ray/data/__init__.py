"""From images to training and prediction batches.

Owns: the tile grid (``tile``), the rows that name tiles and the Ray Data streams that read them
(``dataset``; the only module here that imports Ray), and augmentation (``augment``).
May import: ``io``, ``config.plan``, ``tasks``, ``errors``.
"""
