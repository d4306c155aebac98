"""Data input for fastdelta: image folders, arrays, Fashion-MNIST and transforms."""

from .arrays import ArrayDataset
from .errors import DataError
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    few_shot_subset,
    load_fashion_mnist,
    read_idx,
)
from .folder import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageIndex,
    ImageListDataset,
    check_image,
    is_image_file,
    load_rgb,
    scan_image_folder,
    to_rgb,
)
from .inputs import DataBundle, UserDatasetAdapter, resolve_data
from .transforms import (AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, build_center_transform, build_transforms,
                         is_ten_crop)

__all__ = [
    "AUGMENTATIONS",
    "ArrayDataset",
    "DEFAULT_MAX_PIXELS",
    "DataBundle",
    "DataError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageIndex",
    "ImageListDataset",
    "UserDatasetAdapter",
    "build_center_transform",
    "build_transforms",
    "check_image",
    "few_shot_subset",
    "is_image_file",
    "is_ten_crop",
    "load_fashion_mnist",
    "load_rgb",
    "read_idx",
    "resolve_data",
    "scan_image_folder",
    "to_rgb",
]
