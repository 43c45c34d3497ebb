"""Data preset 'coco' (see detection.py and hqod/data/presets.py)."""
from .detection import dataloader

dataloader.dataset = "coco"
