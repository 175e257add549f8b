"""What a run is asked to do, checked before anything starts.

Owns: the config schema and the InstantDL JSON import (``schema``), the checks of the data folder
against the config (``validate``), the disk-space estimate (``diskspace``) and the plan that fixes
every number of a run (``plan``: tile shape, normalisation per image, target statistics, split).
May import: ``errors``, ``registry``, ``io``, ``data.tile``/``data.augment``/``data.tissue`` (pure parts), ``tasks``,
``models``, ``losses``. Never Ray.
"""
