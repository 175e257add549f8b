"""Files in and out.

Owns: readers of every image format (``read``: lazy arrays, sample discovery, axes), the one
module that writes output files (``write``: TIFF/BigTIFF, zarr, CSV, JSON, stacks, all through
``atomic_path``) and the conversion of image folders to zarr (``convert``).
May import: ``errors``. Never Ray, never torch.
"""
