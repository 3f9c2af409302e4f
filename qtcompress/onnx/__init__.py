"""ONNX: export a model, check it against torch, ship its graph without weights, run it.

Nothing is imported here: ``onnx`` and ``onnxruntime`` load only with the module that uses them.
"""
