import importlib.util
import os
import random
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from t2i_fast.data.writer import DatasetWriter

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when @triton.jit decorates a kernel, i.e. when the
    # module defining it is imported: set this before any t2i_fast.ops module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def float64():
    """float64 as the default dtype for the test: for comparing two computations that are
    equal in exact arithmetic, whose float32 roundings differ by call order and processor."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py imported as a module (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cub_mini_root() -> Path | None:
    """The real CUB subset beside the checkout (../shared/data/cub_mini), or $T2I_CUB_MINI."""
    env = os.environ.get("T2I_CUB_MINI")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/cub_mini"
    return root if (root / "CUB_200_2011/images.txt").is_file() else None


@pytest.fixture(scope="session")
def cub_root() -> Path:
    root = cub_mini_root()
    if root is None:
        pytest.skip("cub_mini not found: expected ../shared/data/cub_mini beside the checkout "
                    "or T2I_CUB_MINI (CI has it)")
    return root


def write_random_dataset(path: Path, *, n: int = 37, size: int = 20, classes: int = 3,
                         max_captions: int = 5, encoding: str = "raw", seed: int = 0) -> Path:
    """Random pixels, 1..max_captions captions of varied length, random classes."""
    rng = np.random.default_rng(seed)
    words = ["red", "bird", "small", "wings", "beak", "a", "the", "has", "white", "long"]
    with DatasetWriter(path, image_size=size, classes=[f"class{c}" for c in range(classes)],
                       source="test", split="all", encoding=encoding) as writer:
        for i in range(n):
            captions = [" ".join(rng.choice(words, rng.integers(2, 40)))
                        for _ in range(rng.integers(1, max_captions + 1))]
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            if encoding == "jpeg":  # smooth content, as photographs are
                image = np.repeat(np.repeat(image[::4, ::4], 4, 0), 4, 1)[:size, :size].copy()
            writer.add(image, captions, class_id=int(rng.integers(0, classes)), name=f"img {i}")
    return path


@pytest.fixture(scope="session")
def random_dataset(tmp_path_factory) -> Path:
    return write_random_dataset(tmp_path_factory.mktemp("data") / "random.lmdb")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A 40-image shapes dataset for short training runs (tests may define their own)."""
    from t2i_fast.prepare.shapes import make_shapes

    path = tmp_path_factory.mktemp("shapes") / "shapes.lmdb"
    make_shapes(out=path, n=40)
    return path


def tiny_run(data: Path, run: Path, **options) -> Path:
    """A `small` run of a step or two on ``data``, made in seconds: batch 8 and a text
    encoder trained with D from scratch unless ``options`` say otherwise."""
    from t2i_fast.train import TrainConfig, train

    settings = {"preset": "small", "batch_size": 8, "max_steps": 1, "train_text_encoder": True,
                **options}
    return train(config=TrainConfig(data=str(data), run=str(run), **settings))


def draw_shape(size, shape, radius, rgb, centre=None):
    """A hard-edged shape drawn independently of the generator, on a grey background."""
    cy, cx = centre or (size / 2, size / 2)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    x, y = xs - cx, ys - cy
    arm = 0.38 * radius
    inside = {
        "circle": np.hypot(x, y) <= radius,
        "square": (np.abs(x) <= radius) & (np.abs(y) <= radius),
        "triangle": (y <= radius) & (2 * np.abs(x) <= y + radius),
        "cross": (((np.abs(x) <= radius) & (np.abs(y) <= arm))
                  | ((np.abs(x) <= arm) & (np.abs(y) <= radius))),
    }[shape]
    image = np.full((size, size, 3), 140, dtype=np.uint8)
    image[inside] = rgb
    return image
