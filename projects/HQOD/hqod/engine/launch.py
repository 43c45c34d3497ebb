"""
Multi-process launch for tools/train_net.py: detectron2's ``launch`` where it can do the job, and
a CPU branch (gloo) where it cannot.

* With CUDA: detectron2's ``launch``, unchanged (NCCL, one process per GPU).
* Without CUDA and more than one process: detectron2 main's ``launch`` falls back to gloo by
  itself and is used as is; detectron2 v0.6's asserts CUDA, so :func:`launch` then spawns the
  processes itself, exactly as detectron2's ``_distributed_worker`` does but with the gloo
  backend (same ranks, same local process group, same ``--num-machines / --machine-rank /
  --dist-url`` semantics).
"""
import importlib
import inspect
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "d2_launch_supports_cpu", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def d2_launch_supports_cpu() -> bool:
    """Whether the installed detectron2's ``launch`` starts CPU processes (gloo) by itself:
    detectron2 main's worker picks gloo without CUDA, v0.6's asserts CUDA (NCCL only)."""
    # By name: ``import detectron2.engine.launch as m`` gives the function ``launch``, which
    # detectron2.engine re-exports over its submodule, and the worker is not in that function.
    launch_module = importlib.import_module("detectron2.engine.launch")
    try:
        source = inspect.getsource(launch_module)
    except (OSError, TypeError):  # no source available: assume the old behaviour
        return False
    return "gloo" in source.lower()


def _find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """
    ``detectron2.engine.launch`` with the same arguments; ``num_processes_per_machine`` is
    detectron2's ``num_gpus_per_machine`` (``--num-gpus``), which counts CPU processes on a
    machine without GPUs.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size == 1 or torch.cuda.is_available() or d2_launch_supports_cpu():
        return d2_launch(
            main_func,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT.")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logging.getLogger(__name__).warning(
            "file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://"
        )
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout
):
    """detectron2's ``_distributed_worker`` for CPU processes: gloo instead of NCCL, no device."""
    global_rank = machine_rank * num_processes_per_machine + local_rank
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores of this machine, don't oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise
    # The local process group (the ranks of this machine), as detectron2 sets it up.
    if hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(num_processes_per_machine)
    else:  # detectron2 v0.6
        assert comm._LOCAL_PROCESS_GROUP is None
        for i in range(world_size // num_processes_per_machine):
            ranks_on_i = list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine))
            pg = dist.new_group(ranks_on_i)
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = pg
    comm.synchronize()
    main_func(*args)
