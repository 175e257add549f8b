"""Files in and out.

Owns: readers of every image format (``read``: lazy arrays, sample discovery, axes; ``slide``:
whole-slide images by region, their levels and pixel size; ``annotations``: QuPath GeoJSON
rasterised on the fly as label images), the one
module that writes output files (``write``: TIFF/BigTIFF, zarr, CSV, JSON, stacks, all through
``atomic_path``) and the conversion of image folders to zarr (``convert``).
May import: ``errors``, ``tasks`` (which layout a task's groundtruth has). Never Ray; torch only
lazily, to save weights (``write.write_torch``).
"""
