"""The pure parts of ``benchmarks/seams.py`` (no Ray, no model; well under a second): seam lines
of a tile grid, the seam / other / excluded grouping of groundtruth objects, IoU matching and
split counting, and the semantic seam bands, on synthetic label images with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.timeout(60)


def test_seam_lines_are_the_core_borders_of_the_grid():
    import seams

    from instantdl_ray.data.tile import tile_grid

    # 768 with tile 256, overlap 64: starts 0, 192, 384, 512; core borders at the overlap midpoints
    tiles = tile_grid((768, 768), 256, 64)
    assert seams.seam_lines(tiles, (768, 768)) == [[224, 416, 576], [224, 416, 576]]
    # non-square: one tile along y (no seam there), 3 along x (starts 0, 128, 256; overlap 128)
    tiles = tile_grid((200, 512), 256, 128)
    assert seams.seam_lines(tiles, (200, 512)) == [[], [192, 320]]
    # one tile: no seams at all
    assert seams.seam_lines(tile_grid((512, 512), 512, 0), (512, 512)) == [[], []]
    # every line separates two cores: the pixel before belongs to one tile's core, the pixel at b to the next
    tiles = tile_grid((768, 768), 256, 64)
    for b in seams.seam_lines(tiles, (768, 768))[1]:
        owners = {i for i, t in enumerate(tiles) if t.core[0].start == 0 and t.core[1].start <= b - 1 < t.core[1].stop}
        nxt = {i for i, t in enumerate(tiles) if t.core[0].start == 0 and t.core[1].start <= b < t.core[1].stop}
        assert len(owners) == len(nxt) == 1 and owners != nxt


def test_mosaic_lines_and_bands():
    import seams

    assert seams.mosaic_lines((768, 512), (256, 256)) == [[256, 512], [256]]
    m = seams.band_mask((10, 20), [[], [10]], 3)
    assert m[:, 7:13].all() and not m[:, :7].any() and not m[:, 13:].any()
    m = seams.band_mask((10, 10), [[2], []], 4)  # clipped at the image border
    assert m[:6].all() and not m[6:].any()


def _square(lab, i, y0, y1, x0, x1):
    lab[y0:y1, x0:x1] = i


def test_object_groups_seam_other_excluded():
    import seams

    gt = np.zeros((60, 60), np.uint16)
    _square(gt, 1, 12, 17, 18, 23)  # x 18..22 crosses the x seam at 20 (pixels at 19 and 20)
    _square(gt, 2, 5, 10, 20, 25)  # x 20..24: starts at the seam, all on one side -> other
    _square(gt, 3, 5, 10, 15, 20)  # x 15..19: ends just before the seam -> other
    _square(gt, 4, 18, 23, 40, 45)  # y 18..22 crosses the y seam at 20 -> seam
    _square(gt, 5, 27, 30, 5, 10)  # y 27..29: touches the mosaic border line 30 (row 29) -> excluded
    _square(gt, 6, 30, 33, 40, 45)  # y 30..32: touches it from the other side (row 30) -> excluded
    _square(gt, 7, 45, 50, 17, 23)  # x 17..22 crosses the seam; y 45..49 and x far from the borders -> seam
    _square(gt, 8, 40, 45, 45, 50)  # x 45..49 touches the x border line 50 (column 49) -> excluded
    g = seams.object_groups(gt, seams=[[20], [20]], borders=[[30], [50]])
    assert g == {1: "seam", 2: "other", 3: "other", 4: "seam", 5: "excluded", 6: "excluded", 7: "seam",
                 8: "excluded"}
    # a non-convex object: an L whose two arms lie on both sides of the seam
    gt = np.zeros((40, 40), np.uint16)
    gt[5:8, 10:30] = 1
    gt[5:20, 10:13] = 1
    assert seams.object_groups(gt, [[], [20]], [[], []]) == {1: "seam"}
    assert seams.object_groups(gt, [[15], []], [[], []]) == {1: "seam"}
    assert seams.object_groups(gt, [[25], [35]], [[], []]) == {1: "other"}


def test_match_objects_iou_and_pieces():
    import seams

    gt = np.zeros((40, 40), np.uint16)
    pred = np.zeros((40, 40), np.uint16)
    _square(gt, 1, 0, 10, 0, 10)  # 100 px
    _square(pred, 1, 0, 10, 0, 8)  # IoU 80/100 = 0.8, one piece
    _square(gt, 2, 20, 30, 0, 10)  # 100 px, split in two halves
    _square(pred, 2, 20, 30, 0, 5)
    _square(pred, 3, 20, 30, 5, 10)
    _square(gt, 3, 20, 30, 20, 30)  # 100 px: a big piece and a 5 % sliver (not a piece)
    _square(pred, 4, 20, 30, 20, 29)
    pred[20:25, 29] = 5
    _square(gt, 4, 0, 10, 30, 40)  # missed
    m = seams.match_objects(gt, pred)
    assert m[1]["best_iou"] == pytest.approx(0.8) and m[1]["pieces"] == 1
    assert m[2]["best_iou"] == pytest.approx(0.5) and m[2]["pieces"] == 2
    assert m[3]["best_iou"] == pytest.approx(0.9) and m[3]["pieces"] == 1
    assert m[4] == {"best_iou": 0.0, "pieces": 0}
    # a prediction larger than the object: IoU = 100 / 200
    pred2 = np.zeros_like(pred)
    _square(pred2, 7, 0, 20, 0, 10)
    assert seams.match_objects(gt, pred2)[1]["best_iou"] == pytest.approx(0.5)


def test_instance_counts_and_summary():
    import seams

    gt = np.zeros((64, 64), np.uint16)
    pred = np.zeros((64, 64), np.uint16)
    # seam at x = 32; mosaic border at y = 48
    _square(gt, 1, 4, 12, 28, 36)  # seam object, predicted whole
    _square(pred, 1, 4, 12, 28, 36)
    _square(gt, 2, 16, 24, 28, 36)  # seam object split at the seam: halves of IoU 0.5 each -> found and split
    _square(pred, 2, 16, 24, 28, 32)
    _square(pred, 3, 16, 24, 32, 36)
    _square(gt, 3, 28, 36, 26, 38)  # seam object split unevenly: IoU 8*4/96 < 0.5 -> missed and split
    _square(pred, 4, 28, 36, 26, 30)
    _square(pred, 5, 28, 36, 30, 34)
    _square(pred, 6, 28, 36, 34, 38)
    _square(gt, 4, 4, 12, 4, 12)  # other, found
    _square(pred, 7, 4, 12, 4, 12)
    _square(gt, 5, 20, 28, 4, 12)  # other, missed
    _square(gt, 6, 44, 52, 4, 12)  # on the mosaic border: excluded even though predicted
    _square(pred, 8, 44, 52, 4, 12)
    c = seams.instance_counts(gt, pred, [[], [32]], [[48], []])
    assert (c["n_seam"], c["found_seam"], c["split_seam"]) == (3, 2, 2)
    assert (c["n_other"], c["found_other"], c["split_other"]) == (2, 1, 0)
    assert c["n_excluded"] == 1
    assert (c["area_seam"], c["area_other"], c["area_excluded"]) == (64 + 64 + 96, 128, 64)
    s = seams.instance_summary(seams.add_counts({}, c))
    assert s["recall_seam"] == pytest.approx(2 / 3) and s["recall_other"] == pytest.approx(0.5)
    assert s["gap"] == pytest.approx(0.5 - 2 / 3) and s["gap_ok"]
    assert s["split_share_seam"] == pytest.approx(2 / 3) and not s["split_ok"]
    assert s["mean_area_seam"] == pytest.approx(224 / 3) and s["mean_area_other"] == pytest.approx(64)
    # pooled over two images: counts add up
    t = seams.add_counts(seams.add_counts({}, c), c)
    assert t["n_seam"] == 6 and seams.instance_summary(t)["recall_seam"] == pytest.approx(2 / 3)
    # no seam objects: nan recall, JSON-safe as None
    empty = seams.instance_summary(seams.instance_counts(gt, pred, [[], []], [[], []]))
    assert empty["n_seam"] == 0 and np.isnan(empty["recall_seam"])
    assert seams.plain({"a": empty["recall_seam"], "b": [np.float32(1.5)]}) == {"a": None, "b": [1.5]}


def test_semantic_counts_bands():
    import seams

    gt = np.zeros((64, 64), np.uint8)
    pred = np.zeros((64, 64), np.uint8)
    gt[:, :] = 1
    pred[:, 24:40] = 1  # right exactly in the band of 8 px around the x seam at 32
    c = seams.semantic_counts(gt, pred, [[], [32]], [[], []], width=8)
    s = seams.semantic_summary(c)
    assert c["pixels_seam"] == 64 * 16 and c["pixels_other"] == 64 * 48
    assert s["jaccard_seam"] == pytest.approx(1.0) and s["jaccard_other"] == pytest.approx(0.0)
    assert s["gap"] == pytest.approx(-1.0)
    # a mosaic border at y = 32 takes 16 rows out of both regions
    c = seams.semantic_counts(gt, pred, [[], [32]], [[32], []], width=8)
    assert c["pixels_seam"] == 48 * 16 and c["pixels_other"] == 48 * 48
    assert c["inter_seam"] == 48 * 16 and c["union_other"] == 48 * 48


def test_shifted_grid_puts_its_seams_between_the_first_grids():
    import seams

    from instantdl_ray.data.tile import tile_grid

    lines = seams.seam_lines(tile_grid((768, 768), 256, 64), (768, 768))
    shift = seams.pick_shift((768, 768), (256, 256), (64, 64), lines)
    assert shift == [96, 96]  # half the 192 px step
    # the padded 864 px axis: starts 0, 192, 384, 576, 608 -> core borders 224, 416, 608, 720 -> minus 96
    other = seams.shifted_lines((768, 768), (256, 256), (64, 64), shift)
    assert other == [[128, 320, 512, 624]] * 2
    assert min(abs(p - q) for p in lines[0] for q in other[0]) >= 2 * seams.BAND


def test_paired_counts_score_each_seam_band_with_and_without_its_seam():
    import seams

    gt = np.zeros((40, 100), np.uint8)
    gt[:, 10:90] = 1
    # grid A has a seam at x=30, grid B one at x=70; A's prediction is wrong in its own seam band only
    pred_a = gt.copy()
    pred_a[:, 26:34] = 0
    pred_b = gt.copy()
    c = seams.paired_summary(seams.paired_semantic_counts(gt, pred_a, pred_b, [[], [30]], [[], [70]], [[], []],
                                                          width=4))
    assert c["pixels_paired"] == 2 * 40 * 8
    # with the seam: A's band (all 0 of 320 gt pixels found) + B's band (320 of 320): 320 / 640
    assert c["jaccard_seam"] == pytest.approx(0.5)
    assert c["jaccard_noseam"] == pytest.approx(1.0)  # B in A's band, A in B's band: all right
    assert c["gap"] == pytest.approx(0.5) and not c["gap_ok"]
    # the same predictions on both grids: no seam cost at all
    c = seams.paired_summary(seams.paired_semantic_counts(gt, pred_b, pred_b, [[], [30]], [[], [70]], [[], []],
                                                          width=4))
    assert c["gap"] == 0 and c["gap_ok"]
    # overlapping bands and mosaic-border bands are left out of the pairing
    c = seams.paired_semantic_counts(gt, pred_b, pred_b, [[], [30]], [[], [34]], [[], [70]], width=4)
    assert c["pixels_paired"] == 2 * 40 * 4
