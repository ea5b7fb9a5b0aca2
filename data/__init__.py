"""Data: labelled images from folder trees and label files, deterministic splits, decoding
any image into RGB, the pixel pipelines for training and evaluation, the DataModule.

Imports: numpy, Pillow, OpenCV and albumentations only, except ``data.datamodule`` which
also uses torch and lightning. The service imports ``data.images`` and
``data.transforms``, so those two must never import torch.
"""
