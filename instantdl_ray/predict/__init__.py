"""Prediction of the test set and of new images.

Owns: the Monte-Carlo-dropout predictor and its Ray actor pool, the writing of each image's
outputs (``pool``; imports Ray) and the stitching of tiles into images with Gaussian blending,
uncertainty and instance labels (``stitch``; plain NumPy).
May import: ``config.plan``, ``data``, ``io``, ``models``, ``tasks``, ``errors``.
"""
