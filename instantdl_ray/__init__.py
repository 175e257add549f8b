"""instantdl_ray: InstantDL's four biomedical deep-learning tasks on Ray.

One config, one command: ``python -m instantdl_ray run config.yaml``.
"""

__version__ = "0.1.0"
