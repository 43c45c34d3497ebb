# Training options for tools/train_net.py (detectron2's lazyconfig_train_net.py keys, plus seed).
train = dict(
    output_dir="./output",
    init_checkpoint="",  # a detectron2 or torchvision ResNet checkpoint, or a full detector's
    max_iter=90000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    device="auto",  # a CUDA GPU when PyTorch sees one, else the CPU; or "cpu", "cuda", "cuda:1"
    seed=0,
    cudnn_benchmark=False,
    # True: deterministic algorithms, so that a run and a run resumed from any of its checkpoints
    # repeat bit for bit (same machine and thread count; needs seed >= 0)
    deterministic=False,
    # median window of the values in metrics.json / TensorBoard (1: each iteration's raw value)
    metrics_window=20,
)
