"""
Deployment of trained detectors to ONNX / ONNX Runtime (tools/export_onnx.py):

    export_onnx(model, "model.onnx", image_size=(512, 512))   # network -> ONNX, Q/DQ for quantized convs
    detector = OnnxDetector(model, "model.onnx")               # ONNX Runtime + detectron2's post-processing
    outputs = detector(batched_inputs)                         # as model(batched_inputs) in inference
    report = compare_onnx_model(model, detector, data_loader)  # agreement with PyTorch, AP of both

:mod:`.qdq` (the Q/DQ conv), :mod:`.export` (what is exported and how), :mod:`.runtime`.
"""
from .export import DetectorNetwork, OnnxExportError, export_onnx, output_names, prepare_for_export
from .qdq import QDQConv2d
from .runtime import OnnxAgreement, OnnxDetector, compare_onnx_model, conv_kernel_counts, executed_kernels, session_options

__all__ = [
    "OnnxExportError",
    "DetectorNetwork",
    "export_onnx",
    "output_names",
    "prepare_for_export",
    "QDQConv2d",
    "OnnxDetector",
    "OnnxAgreement",
    "compare_onnx_model",
    "conv_kernel_counts",
    "executed_kernels",
    "session_options",
]
