"""Shared test setup: one session-scoped local Ray (2 CPUs), tiny synthetic data sets, markers."""

from __future__ import annotations

import os
from pathlib import Path

# Set before torch is imported anywhere, so intra-op pools and Ray workers inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


# Test tiers. ``integration``: whatever starts Ray, another process (``subprocess``, a pip install,
# a cluster) or injects faults into a run; the rest is the unit tier, ``pytest -m "not integration"``
# (about two minutes on 2 cores). A test is integration when it uses one of INTEGRATION_FIXTURES
# (directly or through another fixture), lives in one of these modules, or carries the mark itself.
INTEGRATION_MODULES = {
    "test_benchmarks_smoke", "test_cluster_autoscale", "test_cluster_configs", "test_cluster_onprem",
    "test_cluster_slurm", "test_fault_tolerance", "test_faults", "test_multinode", "test_run_state",
    "test_real_data",
}


INTEGRATION_FIXTURES = {"ray_session", "cli_results"}

# Ray's own lines that must not reach a user's console (issue 18; tests/test_console.py)
RAY_CONSOLE_NOISE = ("Reporting training result", "execution finished", "Progress bars disabled",
                     "TrainingReport(", "Registered dataset logger", "Token authentication is enabled",
                     "RayDeprecationWarning")  # cli_results: the CLI run as subprocesses


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests on real data (minutes)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "integration: starts Ray or another process, or injects faults "
                                       "(the unit tier is -m 'not integration')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance with 2 CPUs for every test that needs Ray (as on a 2-core laptop)."""
    import ray

    from instantdl_ray import _ray

    if not ray.is_initialized():
        _ray.init(num_cpus=2, dashboard=True)  # as `run` starts it for training
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


def _blobs(rng: np.random.Generator, shape=(64, 64), n=4, r=6):
    """A grey image with bright discs and its label image (uint16, 0 = background)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = rng.normal(20, 5, shape)
    lab = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        cy, cx = rng.integers(r + 1, shape[0] - r - 1), rng.integers(r + 1, shape[1] - r - 1)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] += 150
        lab[disc & (lab == 0)] = i
    return np.clip(img, 0, 255).astype(np.uint8), lab


def make_semantic_set(root: Path, n_train=6, n_test=3, shape=(64, 64), seed=0) -> Path:
    """InstantDL layout with PNG images and 0/255 PNG masks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for sub in ("image", "groundtruth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = _blobs(rng, shape)
            Image.fromarray(img).save(root / split / "image" / f"img{i:02d}.png")
            Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(root / split / "groundtruth" / f"img{i:02d}.png")
    return root


def make_run_config(root: Path, epochs: int, extra: str = "") -> Path:
    """``root/cfg.yaml`` for a small semantic run on ``root/data`` (8 train / 2 test synthetic images,
    batch size 2, no early stop, no Monte-Carlo dropout), for the tests that drive
    ``python -m instantdl_ray run`` in a subprocess or on a cluster."""
    data = make_semantic_set(root / "data", n_train=8, n_test=2)
    cfg = root / "cfg.yaml"
    cfg.write_text(f"use_algorithm: semantic\npath: {data}\niterations_over_dataset: {epochs}\nbatchsize: 2\n"
                   "early_stopping_patience: 100\ncalculate_uncertainty: false\n" + extra)
    return cfg


@pytest.fixture
def semantic_set(tmp_path) -> Path:
    return make_semantic_set(tmp_path / "data")


@pytest.fixture
def blobs():
    return _blobs


def make_instance_set(root: Path, n_train=6, n_test=2, shape=(64, 64), seed=0) -> Path:
    """Label-image layout: PNG images, uint16 label TIFFs (0 = background)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for sub in ("image", "groundtruth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = _blobs(rng, shape)
            Image.fromarray(img).save(root / split / "image" / f"img{i:02d}.png")
            tifffile.imwrite(root / split / "groundtruth" / f"img{i:02d}.tif", lab)
    return root


def make_regression_set(root: Path, n_train=6, n_test=2, shape=(64, 64), seed=0, channels=2) -> Path:
    """Multi-channel float TIFF inputs -> a smooth uint16 target with an offset (like isl_dapi)."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for sub in ("image", "groundtruth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = _blobs(rng, shape)
            stack = np.stack([img.astype(np.float32) + rng.normal(0, 3, shape) for _ in range(channels)])
            target = (1000 + 20 * ndi.gaussian_filter((lab > 0).astype(np.float32), 2)).astype(np.uint16)
            tifffile.imwrite(root / split / "image" / f"t{i:02d}.tif", stack.astype(np.float32))
            tifffile.imwrite(root / split / "groundtruth" / f"t{i:02d}.tif", target)
    return root


def make_classification_set(root: Path, n_train=12, n_test=4, shape=(32, 32), seed=0) -> Path:
    """Two classes: one bright disc (0) vs two discs (1), RGB PNG, groundtruth.csv + classes.txt."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "image").mkdir(parents=True, exist_ok=True)
        (root / split / "groundtruth").mkdir(parents=True, exist_ok=True)
        rows = ["filename,groundtruth"]
        for i in range(n):
            c = i % 2
            img, _ = _blobs(rng, shape, n=1 + c, r=4)
            Image.fromarray(np.stack([img] * 3, -1)).save(root / split / "image" / f"c{i:02d}.png")
            rows.append(f"c{i:02d}.png,{c}")
        (root / split / "groundtruth" / "groundtruth.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("0\tsingle\n1\tpair\n")
    return root


# ---------------------------------------------------------------- whole-slide files, written here


def write_aperio_svs(path: Path, rgb: np.ndarray, mpp: float | None = 0.5, downsamples=(4, 16), tile=256) -> Path:
    """An Aperio-style ``.svs``: tiled JPEG pyramid (level 0 + ``downsamples``) with the Aperio
    ImageDescription (``MPP = ..``) that OpenSlide recognises as vendor ``aperio``, plus a stripped
    thumbnail, as scanners write them. ``mpp=None`` leaves the pixel size out."""
    import tifffile

    h, w = rgb.shape[:2]
    meta = f"|AppMag = 20|MPP = {mpp}" if mpp is not None else "|AppMag = 20"
    head = "Aperio Image Library v12.0.15 \r\n"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(tile, tile), compression="jpeg", photometric="rgb", subfiletype=0, metadata=None,
                 description=f"{head}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=90{meta}|Filename = test")
        thumb = np.ascontiguousarray(rgb[::8, ::8])
        tw.write(thumb, photometric="rgb", compression="jpeg", metadata=None,
                 description=f"{head}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {meta}")
        for k in downsamples:
            lv = np.ascontiguousarray(rgb[::k, ::k])
            tw.write(lv, tile=(tile, tile), compression="jpeg", photometric="rgb", subfiletype=1, metadata=None,
                     description=f"{head}{w}x{h} -> {lv.shape[1]}x{lv.shape[0]} - {meta}")
    return path


def write_ome_pyramid(path: Path, rgb: np.ndarray, mpp: float | None = 0.5, downsamples=(2, 4), tile=256) -> Path:
    """An OME-TIFF pyramid: level 0 with the reduced levels as sub-IFDs, ``PhysicalSizeX/Y`` in µm
    (the package's own writer, ``io.write.write_ome_pyramid``)."""
    from instantdl_ray.io.write import write_ome_pyramid as write

    return write(path, rgb, mpp=mpp, downsamples=downsamples, tile=tile)


def write_dicom_wsi(folder: Path, rgb: np.ndarray, mpp: float | None = 0.5, downsamples=(1, 4), tile=256) -> Path:
    """A DICOM WSI as scanners export it: a folder with one VL Whole Slide Microscopy Image file per
    pyramid level (``TILED_FULL`` uncompressed RGB frames, one series, pixel spacing in mm in the
    shared functional groups), written with pydicom; OpenSlide reads it as vendor ``dicom``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    wsm = "1.2.840.10008.5.1.4.1.1.77.1.6"
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for k, d in enumerate(downsamples):
        level = np.ascontiguousarray(rgb[::d, ::d])
        h, w = level.shape[:2]
        ny, nx = -(-h // tile), -(-w // tile)
        frames = np.zeros((ny * nx, tile, tile, 3), np.uint8)
        for i in range(ny):
            for j in range(nx):
                part = level[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                frames[i * nx + j, :part.shape[0], :part.shape[1]] = part
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = wsm
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality, ds.InstanceNumber = wsm, "SM", k + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.ImageType = ["ORIGINAL" if d == 1 else "DERIVED", "PRIMARY", "VOLUME", "NONE" if d == 1 else "RESAMPLED"]
        ds.Rows, ds.Columns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = tile, tile, h, w
        ds.NumberOfFrames, ds.DimensionOrganizationType = ny * nx, "TILED_FULL"
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = [path]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if mpp is not None:
            measures = Dataset()
            measures.PixelSpacing = [mpp * d / 1000, mpp * d / 1000]  # mm
            measures.SliceThickness = 0.001
            shared = Dataset()
            shared.PixelMeasuresSequence = [measures]
            ds.SharedFunctionalGroupsSequence = [shared]
            ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * mpp * d / 1000, h * mpp * d / 1000, 0.001
        ds.PixelData = frames.tobytes()
        ds.save_as(folder / f"level{k}.dcm", enforce_file_format=True)
    return folder


def tissue_image(shape=(1536, 2048), seed=0) -> np.ndarray:
    """Bright glass with two H&E-like (purple) tissue patches and dark nuclei: (Y, X, 3) uint8."""
    rng = np.random.default_rng(seed)
    img = np.full(shape + (3,), 236, np.uint8)
    img[300:900, 400:1300] = (200, 140, 190)
    img[1000:1400, 1500:1900] = (190, 130, 180)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for cy, cx in rng.integers((320, 420), (880, 1280), (40, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = (90, 40, 120)
    return img


def annotated_slide(src: Path, names: list[str], image: Path, geojson: Path, side: int = 1024, seed: int = 0) -> np.ndarray:
    """An Aperio ``.svs`` of ``side``² dark 'glass' (camera noise) with the DSB images ``names`` of
    ``src`` (``image/``, ``groundtruth/``) pasted 320 px apart, and the QuPath GeoJSON of it: a
    ``Region*`` rectangle per pasted image and a ``Nucleus`` polygon per object. Returns the label."""
    import json

    from PIL import Image
    from shapely.geometry import box, mapping
    from skimage.measure import label as components

    from instantdl_ray.predict.shapes import label_features

    rng = np.random.default_rng(seed)
    slide = np.clip(rng.normal(6, 2, (side, side)), 0, 255).astype(np.uint8)
    truth = np.zeros((side, side), np.uint8)
    feats = []
    cells = [(y, x) for y in range(0, side - 255, 320) for x in range(0, side - 255, 320)]
    for (y, x), n in zip(cells, names):
        im = np.asarray(Image.open(src / "image" / n).convert("L"))
        m = np.asarray(Image.open(src / "groundtruth" / n)) > 0
        h, w = im.shape
        slide[y:y + h, x:x + w] = im
        truth[y:y + h, x:x + w] = m
        feats.append({"type": "Feature", "geometry": mapping(box(x, y, x + w, y + h)),
                      "properties": {"objectType": "annotation", "classification": {"name": "Region*", "color": [0, 0, 180]}}})
        feats += list(label_features(components(m), "Nucleus", y, x))
    write_aperio_svs(image, np.repeat(slide[..., None], 3, axis=2), mpp=0.5)
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return truth
