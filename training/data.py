"""ImageFolder data for the train and evaluate programs.

``--data-path`` points at a folder with ``train/`` and ``val/``, each holding one sub-folder
per class (the ImageNet layout torchvision's ``ImageFolder`` reads). Transforms follow
torchvision's classification references: random-resized crop and flip for training, resize
then centre crop for validation, ImageNet mean/std normalisation. The training recipe's extras
are the references' too: an automatic augmentation policy after the flip (``--auto-augment``),
random erasing after normalisation (``--random-erase``), and MixUp / CutMix on whole batches in
the loader's ``collate_fn`` (``--mixup-alpha`` / ``--cutmix-alpha``), which turns the integer
targets into class probabilities. Every transform is ``torchvision.transforms.v2`` (the
references' v2 path with the PIL backend: crops and flips on the PIL image, then
``PILToTensor`` + ``ToDtype(float32, scale=True)`` in place of v1's ``ToTensor``).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUTO_AUGMENT_POLICIES = ("ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn")


def _to_normalized_tensor():
    """PIL image -> float32 tensor in [0, 1] -> ImageNet-normalised (v1's ``ToTensor`` + ``Normalize``)."""
    from torchvision.transforms import v2

    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(
    image_size: int,
    augment: bool = True,
    auto_augment: str | None = None,
    ra_magnitude: int = 9,
    augmix_severity: int = 3,
    random_erase: float = 0.0,
):
    from torchvision.transforms import v2

    if augment:
        head = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
        if auto_augment is not None:
            head.append(auto_augment_transform(auto_augment, ra_magnitude, augmix_severity))
    else:  # deterministic: the same tensor for an image every epoch, on every process
        head = [v2.Resize((image_size, image_size), antialias=True)]
    tail = [v2.RandomErasing(p=random_erase)] if augment and random_erase > 0 else []
    # ToPureTensor: plain tensors into the loader's collate, as the references do
    return v2.Compose([*head, *_to_normalized_tensor(), *tail, v2.ToPureTensor()])


def auto_augment_transform(policy: str, ra_magnitude: int = 9, augmix_severity: int = 3):
    """The references' ``--auto-augment`` choices: RandAugment, TrivialAugmentWide, AugMix, or an AutoAugment policy."""
    from torchvision.transforms import v2

    if policy == "ra":
        return v2.RandAugment(magnitude=ra_magnitude)
    if policy == "ta_wide":
        return v2.TrivialAugmentWide()
    if policy == "augmix":
        return v2.AugMix(severity=augmix_severity)
    if policy in AUTO_AUGMENT_POLICIES:
        return v2.AutoAugment(v2.AutoAugmentPolicy(policy))
    raise ValueError(f"unknown auto-augment policy {policy!r}; choose one of {', '.join(AUTO_AUGMENT_POLICIES)}")


class MixUpCutMixCollate:
    """``collate_fn`` that applies MixUp or CutMix (one of the enabled ones, picked per batch).

    Targets leave as ``[B, num_classes]`` probabilities (rows sum to 1), which
    ``nn.CrossEntropyLoss`` accepts, label smoothing included. Randomness comes from the
    global torch generator of the process that collates (the loader's worker, seeded from the
    main process), so it repeats with the epoch's seed. A class rather than a lambda so that
    loader workers can be spawned (pickled).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        from torchvision.transforms import v2

        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("MixUpCutMixCollate needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.transform = v2.RandomChoice(choices)

    def __call__(self, batch):
        images, targets = default_collate(batch)
        return self.transform(images, targets)


def mixup_cutmix_collate(num_classes: int, mixup_alpha: float, cutmix_alpha: float):
    """:class:`MixUpCutMixCollate`, or ``None`` (the loader's default collate) when both alphas are 0."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return MixUpCutMixCollate(num_classes, mixup_alpha, cutmix_alpha)


def val_transform(image_size: int, resize_size: int | None = None):
    from torchvision.transforms import v2

    # 224 px crops come from 256 px resizes in the references: keep that ratio by default.
    resize_size = resize_size or round(image_size / 0.875)
    return v2.Compose(
        [
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalized_tensor(),
            v2.ToPureTensor(),
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


def make_loader(
    dataset, batch_size: int, sampler: Sampler, workers: int, device: torch.device, collate_fn=None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        drop_last=False,
        collate_fn=collate_fn,
    )
