"""Framework exporters (PyTorch, TensorFlow/Keras -> ONNX), installed as ``cfp_onnx.exporters``.

Only this package and the tests import torch or tensorflow; the analyzer never does.
"""
