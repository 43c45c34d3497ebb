from .checkpoint import Checkpointer, ExtraTrainingState, read_checkpoint, torchvision_resnet_to_d2
from .defaults import (
    USER_ERRORS,
    TrainingDiverged,
    UserError,
    check_output_dir,
    config_differences,
    export_tool_main,
    final_checkpoint,
    load_config,
    load_trained_model,
    resolve_device,
    run_tool,
    setup_determinism,
    user_error_message,
)
from .distributed import convert_sync_batchnorm
from .loss_normalizers import LossNormalizers, track_loss_normalizers
from .launch import launch
from .train_loop import build_model, build_trainer, do_test, do_train

__all__ = [
    "USER_ERRORS",
    "Checkpointer",
    "ExtraTrainingState",
    "TrainingDiverged",
    "UserError",
    "build_model",
    "build_trainer",
    "check_output_dir",
    "config_differences",
    "convert_sync_batchnorm",
    "do_test",
    "do_train",
    "load_trained_model",
    "export_tool_main",
    "final_checkpoint",
    "run_tool",
    "launch",
    "load_config",
    "read_checkpoint",
    "resolve_device",
    "setup_determinism",
    "LossNormalizers",
    "track_loss_normalizers",
    "torchvision_resnet_to_d2",
    "user_error_message",
]
