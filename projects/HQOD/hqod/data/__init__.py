from . import presets  # noqa: F401  registers the ${hqod_data:...} OmegaConf resolver
from .datasets import DatasetError, datasets_root, ensure_datasets, register_all
from .digits import CLASS_NAMES as DIGITS_CLASSES, DigitsSpec, generate_digits

register_all()

__all__ = [
    "DatasetError",
    "DIGITS_CLASSES",
    "DigitsSpec",
    "datasets_root",
    "ensure_datasets",
    "generate_digits",
    "register_all",
]
