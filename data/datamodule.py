"""The torch Dataset and LightningDataModule over a split of labelled images."""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from albumentations import Compose
from torch.utils.data import DataLoader, Dataset, get_worker_info

from convtune.data.datasets import LabelledImages
from convtune.data.images import decode_rgb
from convtune.data.preprocessing import (
    EvalTransform,
    Preprocessing,
    build_eval_transform,
    eval_decode_size,
)
from convtune.data.splits import Split
from convtune.data.transforms import Augmentation, build_train_transform


def drops_last_batch(images: int, batch_size: int) -> bool:
    """Whether a pass over ``images`` images with BatchNorm in train mode (the train
    loader, the BatchNorm re-estimate) drops its partial last batch: only where a full
    batch remains. A last batch of one image has one value per channel where a layer's maps
    are 1x1, and BatchNorm refuses it in train mode."""
    return images > batch_size


def train_batches_per_process(train_images: int, *, batch_size: int, processes: int) -> int:
    """Training batches per epoch in each of ``processes`` training processes.

    Lightning hands each process ``ceil(train_images / processes)`` images (its
    DistributedSampler repeats a few to even them out) through the train loader, which
    drops a partial last batch where :func:`drops_last_batch` says so for all the images:
    several processes can each be left with no full batch, and train no step."""
    per_process = math.ceil(train_images / processes)
    if drops_last_batch(train_images, batch_size):
        return per_process // batch_size
    return math.ceil(per_process / batch_size)


class ImageDataset(Dataset):
    """Decodes each image to RGB (or takes it from a cache) and applies a pipeline."""

    def __init__(
        self,
        images: LabelledImages,
        transform: Compose | EvalTransform,
        *,
        draft_size: tuple[int, int] | None = None,
        cache: dict[Path, np.ndarray] | None = None,
    ) -> None:
        self.images = images
        self.transform = transform
        self.draft_size = draft_size
        self.cache = cache

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.images.paths[index]
        if self.cache is not None and path in self.cache:
            pixels = self.cache[path]
        else:
            pixels = decode_rgb(path, draft_size=self.draft_size)
        tensor = self.transform(image=pixels)["image"]
        return torch.from_numpy(tensor), self.images.labels[index]


def decode_all(paths: tuple[Path, ...], *, draft_size: tuple[int, int]) -> dict[Path, np.ndarray]:
    """Decode every image once, as the eval view decodes it (JPEGs shrunk while decoding).

    Decoding a PNG or JPEG costs more than augmenting the array it yields, and on a
    machine with few cores DataLoader workers compete with the model for them. The cached
    arrays are exactly what ``convtune evaluate`` and the service decode, so validation,
    calibration and the test report see the served pixels. Filled in the main process
    before workers fork, the arrays are shared, not copied.
    """
    from rich.progress import track

    return {
        path: decode_rgb(path, draft_size=draft_size)
        for path in track(paths, description="Caching decoded images", transient=True)
    }


def seed_worker_transforms(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream.

    albumentations 2.0.8 copies the parent's random state into every worker, so without
    this all workers would apply identical augmentations. ``torch.initial_seed()`` differs
    per worker and per epoch and derives from the run's seed, so runs stay reproducible.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = get_worker_info()
    # Only training's pipeline is random (an albumentations Compose); the eval one is fixed.
    dataset = info.dataset if info is not None else None
    if isinstance(dataset, ImageDataset) and isinstance(dataset.transform, Compose):
        dataset.transform.set_random_seed(seed)


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders for one :class:`Split` of a :class:`LabelledImages`."""

    def __init__(
        self,
        images: LabelledImages,
        split: Split,
        preprocessing: Preprocessing,
        *,
        augmentation: Augmentation,
        train_size: tuple[int, int] | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        cache_images: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.images = images
        self.split = split
        self.preprocessing = preprocessing
        self.augmentation = augmentation
        self.train_size = train_size or preprocessing.input_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_images = cache_images
        self.cache: dict[Path, np.ndarray] | None = None
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.cache_images and self.cache is None:
            self.cache = decode_all(
                self.images.paths, draft_size=eval_decode_size(self.preprocessing)
            )

    def images_in(self, name: str) -> LabelledImages:
        """The images of the split's part ``name`` (``train``, ``val`` or ``test``)."""
        return self.images.subset(list(self.split.indices(name)))

    def dataset(self, name: str) -> ImageDataset:
        if name != "train":
            return self.eval_dataset(name)
        transform = build_train_transform(
            self.preprocessing, self.augmentation, input_size=self.train_size
        )
        transform.set_random_seed(self.seed)
        height, width = self.train_size
        # RandomResizedCrop may take a quarter of the area; keep enough pixels for it.
        draft = (2 * width, 2 * height)
        return ImageDataset(self.images_in(name), transform, draft_size=draft, cache=self.cache)

    def eval_dataset(self, name: str) -> ImageDataset:
        """Part ``name`` through the eval view: the pixels ``convtune evaluate`` and the
        service compute for the same files."""
        return ImageDataset(
            self.images_in(name),
            build_eval_transform(self.preprocessing),
            draft_size=eval_decode_size(self.preprocessing),
            cache=self.cache,
        )

    def eval_loader(self, name: str) -> DataLoader:
        """Part ``name`` through the eval view, in order (for features and logits)."""
        return DataLoader(
            self.eval_dataset(name), batch_size=self.batch_size, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _loader(self, name: str, *, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(name),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            worker_init_fn=seed_worker_transforms,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and drops_last_batch(len(self.split.indices(name)), self.batch_size),
        )
