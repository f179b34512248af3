"""Data sets: the embedded GTSRB (32x32), any ``.npz``, image folders and the official GTSRB layout.

Images are held as raw uint8 arrays ``(N, H, W, C)`` so triggers are stamped in raw pixel space before any
model-specific normalisation; models receive float ``(N, C, H, W)`` tensors in [0, 1].
"""

from .datasets import (
    BUNDLED_TROJANNET,
    BUNDLED_VICTIM,
    EMBEDDED_GTSRB,
    EMBEDDED_GTSRB5,
    GTSRB_CLASS_NAMES,
    DataSplits,
    ImageSet,
    load_dataset,
    load_image_folder,
    load_npz,
    load_torchvision_gtsrb,
    to_tensor,
)

__all__ = [
    "EMBEDDED_GTSRB",
    "BUNDLED_TROJANNET",
    "BUNDLED_VICTIM",
    "EMBEDDED_GTSRB5",
    "GTSRB_CLASS_NAMES",
    "DataSplits",
    "ImageSet",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "load_torchvision_gtsrb",
    "to_tensor",
]
