"""ImageFolder data for the train and evaluate programs.

``--data-path`` points at a folder with ``train/`` and ``val/``, each holding one sub-folder
per class (the ImageNet layout torchvision's ``ImageFolder`` reads). Transforms follow
torchvision's classification references: random-resized crop and flip for training, resize
then centre crop for validation, ImageNet mean/std normalisation.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int, augment: bool = True):
    from torchvision import transforms as T

    if augment:
        head = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:  # deterministic: the same tensor for an image every epoch, on every process
        head = [T.Resize((image_size, image_size), antialias=True)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def val_transform(image_size: int, resize_size: int | None = None):
    from torchvision import transforms as T

    # 224 px crops come from 256 px resizes in the references: keep that ratio by default.
    resize_size = resize_size or round(image_size / 0.875)
    return T.Compose(
        [
            T.Resize(resize_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def image_folder(root: str, split: str, transform):
    """``ImageFolder(root/split)`` with an error that says what was expected."""
    from torchvision.datasets import ImageFolder

    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--data-path {root!r} has no {split}/ folder: expected {root}/{split}/<class>/<image> (ImageFolder layout)"
        )
    return ImageFolder(path, transform=transform)


def make_loader(dataset, batch_size: int, sampler: Sampler, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        drop_last=False,
    )
