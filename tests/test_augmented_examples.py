"""InstantDL keys that used to be accepted and ignored (issue 12 item 11)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import make_classification_set, make_semantic_set
from instantdl_ray import pipeline
from instantdl_ray.config import schema as config
from instantdl_ray.data.augment import AugmentParams
from instantdl_ray.errors import DataError
from instantdl_ray.config.plan import make_plan
from instantdl_ray.config.validate import validate


@pytest.mark.parametrize("task,maker", [("semantic", make_semantic_set), ("classification", make_classification_set)])
def test_save_augmented_images_writes_the_training_tiles(tmp_path, task, maker):
    data = maker(tmp_path / "data")
    cfg = config.from_dict({"use_algorithm": task, "path": str(data),
                            "data_gen_args": {"save_augmented_images": True, "rotation_range": 30}})
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    paths = pipeline.save_augmented(cfg, plan, inv, AugmentParams.from_dict(cfg.data_gen_args.model_dump()),
                                    tmp_path / "run" / "augmented", n=4)
    assert len(paths) == 4 and all(p.exists() and p.suffix == ".png" for p in paths)
    img = np.asarray(Image.open(paths[0]))
    assert img.ndim == 3 and img.shape[0] > 50 and img.std() > 0  # a real picture, not a blank canvas


def test_resample_images_is_refused_with_the_key_named(tmp_path):
    data = make_semantic_set(tmp_path / "data")
    cfg = config.from_dict({"use_algorithm": "semantic", "path": str(data),
                            "data_gen_args": {"resample_images": True}})
    with pytest.raises(DataError) as e:
        validate(cfg)
    assert "data_gen_args.resample_images" in str(e.value) and "false" in str(e.value)
    validate(config.from_dict({"use_algorithm": "semantic", "path": str(data),
                               "data_gen_args": {"resample_images": False}}))  # InstantDL's configs say false
