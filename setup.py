#!/usr/bin/env python
"""HQOD-D2: low-bit quantized one-stage detectors for detectron2 (HQOD, AQD, Reg-PTQ).

Installs the package ``hqod`` from ``projects/HQOD/hqod``; ``tools/install.sh`` installs it in
editable mode together with its pinned dependencies (requirements.txt) and detectron2.
"""
from setuptools import find_packages, setup

setup(
    name="hqod-d2",
    version="0.1.0",
    description="Harmonious quantization (HQOD) and AQD for detectron2 one-stage detectors",
    python_requires=">=3.9",
    package_dir={"": "projects/HQOD"},
    packages=find_packages("projects/HQOD"),
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "scikit-learn", "matplotlib"],
)
