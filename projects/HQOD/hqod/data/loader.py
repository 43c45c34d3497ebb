"""
A training data loader that resumes exactly and does not depend on the number of processes.

:func:`build_detection_train_loader` takes the arguments of detectron2's function of that name
(``dataset``, ``mapper``, ``total_batch_size``, ``aspect_ratio_grouping``, ``num_workers``) and
yields the same thing — lists of mapped dicts, ``total_batch_size / world_size`` per process —
but its data stream is a pure function of (seed, position):

* the *global stream* is an infinite sequence of dataset indices, one seeded random permutation
  per epoch (epoch ``e`` uses the seed ``(seed, e)``); process ``r`` of ``W`` reads positions
  ``r, r + W, r + 2W, ...`` (detectron2's TrainingSampler does the same with one generator);
* the random augmentations of the image at global position ``g`` are drawn from NumPy / Python
  generators seeded by ``(seed, g)``, whichever process or data-loading worker maps it;
* batches group images by aspect ratio (w > h or not) exactly as detectron2's
  ``AspectRatioGroupedDataset``, from the ``width``/``height`` of the dataset dicts.

So the batches of iteration ``t`` are known without loading a single image: resuming at
iteration ``t`` (:meth:`ResumableTrainLoader.set_start_iter`) replays the grouping on indices and
continues with exactly the images and augmentations an uninterrupted run would have used
(detectron2's sampler would restart its stream). And N processes with batch B/N together see
the images and augmentations of one process with batch B, as long as every image falls in one
aspect-ratio group (otherwise each process groups its own share, as detectron2 does).

The seed (detectron2's shared random seed when not given) is part of the trainer's checkpoint
(:meth:`state_dict`), so a resumed run continues the same stream even with ``train.seed=-1``.
"""
import logging
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

__all__ = ["build_detection_train_loader", "ResumableTrainLoader"]

logger = logging.getLogger(__name__)


def _trivial_batch_collator(batch):
    return batch


def _mix(*ints) -> int:
    """A 32-bit seed from non-negative ints (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(i) % (1 << 63) for i in ints]).generate_state(1)[0])


class _Stream:
    """Global position -> dataset index: one seeded permutation per epoch (one cached)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch, self._perm = None, None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator()
            g.manual_seed(_mix(self.seed, epoch))
            self._perm = torch.randperm(self.size, generator=g).tolist()
            self._epoch = epoch
        return self._perm[offset]


class _PositionDataset(torchdata.Dataset):
    """Map-style dataset over global stream positions: ``ds[g]`` maps the dataset dict at
    position ``g`` with random augmentations seeded by ``(seed, g)``."""

    def __init__(self, dataset, mapper, stream: _Stream):
        self.dataset, self.mapper, self.stream = dataset, mapper, stream

    def __getitem__(self, position):
        idx = self.stream(position)
        for attempt in range(10):
            seed = _mix(self.stream.seed, position, attempt)
            np_state, py_state = np.random.get_state(), random.getstate()
            np.random.seed(seed)
            random.seed(seed)
            try:
                data = self.mapper(self.dataset[idx])
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
            if data is not None:
                return data
            # as detectron2's MapDataset: the mapper dropped this image; take another one,
            # chosen deterministically from the position
            if attempt >= 2:
                logger.warning(f"Failed to map training image {idx} (position {position}), attempt {attempt + 1}")
            idx = random.Random(seed).randrange(len(self.dataset))
        raise RuntimeError(f"The mapper returned None for 10 images in a row at stream position {position}.")


class ResumableTrainLoader:
    """
    Iterable of training batches (lists of mapped dicts) for this process; see the module
    docstring. ``set_start_iter(t)`` before iterating makes the first batch the one of
    iteration ``t``; ``state_dict()`` / ``load_state_dict()`` carry the seed in checkpoints.
    """

    def __init__(
        self,
        dataset,
        *,
        mapper,
        total_batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        seed=None,
        shuffle: bool = True,
    ):
        world, rank = comm.get_world_size(), comm.get_rank()
        if total_batch_size <= 0 or total_batch_size % world != 0:
            raise ValueError(
                f"Total batch size ({total_batch_size}) must be divisible by the number of "
                f"processes ({world}): change dataloader.train.total_batch_size or --num-gpus."
            )
        if isinstance(dataset, (DatasetFromList, list, tuple)) or isinstance(dataset, Sequence):
            size = len(dataset)
        else:
            raise TypeError(
                "build_detection_train_loader (hqod) needs a list of dataset dicts (e.g. from "
                f"get_detection_dataset_dicts); got {type(dataset).__name__}."
            )
        if size == 0:
            raise ValueError("The training dataset is empty.")
        self.world_size, self.rank = world, rank
        self.total_batch_size = total_batch_size
        self.batch_size = total_batch_size // world
        self.num_workers = num_workers
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.shuffle = shuffle
        if aspect_ratio_grouping:
            self._buckets = [0 if d["width"] > d["height"] else 1 for d in dataset]
        else:
            self._buckets = [0] * size
        self._dataset = dataset if isinstance(dataset, DatasetFromList) else DatasetFromList(list(dataset), copy=False)
        self._mapper = mapper
        self.start_iter = 0
        logger.info(
            f"Training data: {size} images, stream seed {self.seed}, batch {self.batch_size} per "
            f"process x {world} processes, aspect-ratio grouping {'on' if aspect_ratio_grouping else 'off'}."
        )

    # ---- resuming ----
    def set_start_iter(self, start_iter: int):
        """The next iteration over this loader starts with the batch of iteration ``start_iter``
        (batches 0 .. start_iter - 1 are skipped without loading images)."""
        self.start_iter = int(start_iter)

    def state_dict(self):
        return {"seed": self.seed, "world_size": self.world_size, "total_batch_size": self.total_batch_size}

    def load_state_dict(self, state):
        self.seed = int(state["seed"])
        if (state.get("world_size"), state.get("total_batch_size")) != (self.world_size, self.total_batch_size):
            logger.warning(
                f"The checkpoint's data stream was made by {state.get('world_size')} processes with "
                f"total batch {state.get('total_batch_size')}; now {self.world_size} with "
                f"{self.total_batch_size}: the same images follow, grouped into batches differently."
            )

    # ---- the stream ----
    def batch_positions(self):
        """Infinite iterator over this process's batches as lists of global stream positions,
        starting with the batch of iteration ``start_iter``."""
        stream = _Stream(len(self._buckets), self.seed, self.shuffle)
        buckets = ([], [])
        k, produced = 0, 0
        while True:
            position = self.rank + k * self.world_size
            k += 1
            bucket = buckets[self._buckets[stream(position)]]
            bucket.append(position)
            if len(bucket) == self.batch_size:
                if produced >= self.start_iter:
                    yield bucket[:]
                produced += 1
                del bucket[:]

    def __iter__(self):
        # A generator: nothing runs (and start_iter is not read) before the first next().
        stream = _Stream(len(self._buckets), self.seed, self.shuffle)
        dataset = _PositionDataset(self._dataset, self._mapper, stream)
        if self.num_workers == 0:
            for positions in self.batch_positions():
                yield [dataset[g] for g in positions]
        else:
            loader = torchdata.DataLoader(
                dataset,
                batch_sampler=self.batch_positions(),
                num_workers=self.num_workers,
                collate_fn=_trivial_batch_collator,
            )
            yield from loader


def build_detection_train_loader(
    dataset,
    *,
    mapper,
    total_batch_size,
    aspect_ratio_grouping=True,
    num_workers=0,
    sampler=None,
    seed=None,
):
    """detectron2's ``build_detection_train_loader`` (same arguments and batches of lists of
    mapped dicts) as a :class:`ResumableTrainLoader`. ``sampler`` must be None: the stream is
    this loader's own (see the module docstring)."""
    if sampler is not None:
        raise ValueError(
            "hqod's build_detection_train_loader draws its own resumable stream; use "
            "detectron2.data.build_detection_train_loader for a custom sampler."
        )
    return ResumableTrainLoader(
        dataset,
        mapper=mapper,
        total_batch_size=total_batch_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
        seed=seed,
    )
