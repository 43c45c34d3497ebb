from .checkpoint import Checkpointer, torchvision_resnet_to_d2
from .defaults import UserError, check_output_dir, load_config, resolve_device
from .train_loop import build_model, do_test, do_train

__all__ = [
    "Checkpointer",
    "UserError",
    "build_model",
    "check_output_dir",
    "do_test",
    "do_train",
    "load_config",
    "resolve_device",
    "torchvision_resnet_to_d2",
]
