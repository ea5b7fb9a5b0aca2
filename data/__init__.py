"""Data: everything between image files (or uploads) and the encoder's input arrays.

Training, evaluation and the service all decode and preprocess through this package, so
they see the same pixels; datasets on disk and their train/val/test splits live here too.

Imports: numpy, Pillow, OpenCV, albumentations and rich only; torch and lightning in
``data.datamodule`` alone. The service imports ``data.images`` and ``data.preprocessing``,
so those two use numpy, Pillow and OpenCV only (albumentations loads torch where it is
installed). Never ``models``, ``training`` or ``service``.
"""
