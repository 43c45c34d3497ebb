"""HQOD-D2: quantization-aware training of one-stage detectors in detectron2."""
import warnings

# detectron2 v0.6 scripts a few helpers with torch.jit.script, which torch >= 2.10 deprecates.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
