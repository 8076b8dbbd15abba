"""The datasets lstmlab knows, as data: each one's four IDX files, their checksums, class names, download mirrors
and system folder; and the sequence views (T, I) an LSTM reads an image as. Adding an MNIST-format dataset is
one ``DatasetInfo`` entry here. Torch-free: the flags read the names from this module.

Checksums are SHA-256 of each file's *decompressed* bytes, because mirrors gzip the same content differently
(Debian's Fashion-MNIST package, for one, has other ``.gz`` bytes than Zalando's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lstmlab.errors import LstmlabError

IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
SPLITS = ("train", "test")
# the four files of an MNIST-format dataset: (split, kind) -> name without ".gz"
FILE_NAMES: Mapping[tuple[str, str], str] = MappingProxyType(
    {
        ("train", "images"): "train-images-idx3-ubyte",
        ("train", "labels"): "train-labels-idx1-ubyte",
        ("test", "images"): "t10k-images-idx3-ubyte",
        ("test", "labels"): "t10k-labels-idx1-ubyte",
    }
)


@dataclass(frozen=True)
class DatasetInfo:
    """One MNIST-format dataset: its files, their checksums, class names, download mirrors, and where a system
    package installs it (searched after $LSTMLAB_DATA, before the cache)."""

    name: str
    sha256: Mapping[str, str]  # file name (without .gz) -> SHA-256 of the decompressed bytes
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs; a file's URL is base + name + ".gz"
    system_dir: Path | None = None  # a distribution package's folder of the files
    system_package: str | None = None  # that package's name, for the offline error

    @property
    def files(self) -> tuple[str, ...]:
        """The four file names, without ``.gz``."""
        return tuple(FILE_NAMES.values())


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "mnist": DatasetInfo(
            name="mnist",
            sha256=MappingProxyType(
                {
                    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                }
            ),
            classes=tuple(str(d) for d in range(10)),
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
            ),
        ),
        "fashion-mnist": DatasetInfo(
            name="fashion-mnist",
            sha256=MappingProxyType(
                {
                    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                }
            ),
            classes=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            mirrors=(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            ),
            system_dir=Path("/usr/share/datasets/fashion-mnist"),  # Debian/Ubuntu package
            system_package="dataset-fashion-mnist",
        ),
    }
)

# (T, I) of each view: time steps and inputs per step
VIEWS: Mapping[str, tuple[int, int]] = MappingProxyType({"rows": (28, 28), "pixels": (784, 1), "permuted": (784, 1)})


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``; an unknown name is an LstmlabError listing the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        valid = ", ".join(DATASETS)
        raise LstmlabError(f"unknown dataset {name!r}; choose one of: {valid}") from None



# Decompressed size of each standard file (the same for MNIST and Fashion-MNIST): header + payload.
KNOWN_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
        "train-labels-idx1-ubyte": 8 + 60_000,
        "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
        "t10k-labels-idx1-ubyte": 8 + 10_000,
    }
)
