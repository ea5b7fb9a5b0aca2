"""Datasets, splits and image transforms.

What lives here: reading labelled images from a folder tree or a label file
(``data.sources``), the deterministic stratified split (``data.splits``), decoding any
image into RGB (``data.images``), the albumentations pipelines (``data.transforms``) and
the LightningDataModule (``data.datamodule``).

Imports: numpy, Pillow and albumentations only, except ``data.datamodule`` which also uses
torch and lightning. The service imports ``data.images`` and ``data.transforms``, so those
two must never import torch.
"""
