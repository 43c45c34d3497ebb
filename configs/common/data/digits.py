"""Data preset 'digits' (see detection.py and hqod/data/presets.py)."""
from .detection import dataloader

dataloader.dataset = "digits"
