import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer


def _is_torchvision_resnet(state_dict):
    return isinstance(state_dict, dict) and "conv1.weight" in state_dict and any(
        k.startswith("layer1.") for k in state_dict
    )


def torchvision_resnet_to_d2(state_dict):
    """Rename a torchvision ResNet state dict to detectron2's ResNet names (as detectron2's
    tools/convert-torchvision-to-d2.py does); the classifier ``fc`` is dropped."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("fc."):
            continue
        k = re.sub(r"^conv1\.", "stem.conv1.", k)
        k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
        k = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", k)
        k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
        k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        out[k] = v
    return out


class Checkpointer(DetectionCheckpointer):
    """
    detectron2's DetectionCheckpointer that also loads torchvision ResNet checkpoints (``.pth``
    from torchvision.models, as ``train.init_checkpoint``) into the backbone, and says clearly
    when a checkpoint file does not exist.
    """

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"Checkpoint {path} does not exist. Set train.init_checkpoint to an existing "
                'file (or to "" to train from scratch).'
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if filename.endswith((".pth", ".pt")):
            loaded = torch.load(filename, map_location="cpu", weights_only=False)
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
            if _is_torchvision_resnet(state):
                return {
                    "model": torchvision_resnet_to_d2(state),
                    "__author__": "torchvision",
                    "matching_heuristics": True,
                }
            if isinstance(loaded, dict) and "model" not in loaded:
                loaded = {"model": loaded}
            return loaded
        return super()._load_file(filename)
