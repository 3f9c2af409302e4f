"""Training the generator: phase 1 reproduces the pretrained weights, phase 2 fine-tunes.

- ``loop.py``: the loop both phases share (schedule, early stopping, checkpoints, resume).
- ``weight_fit.py``: phase 1, the weight-space fit.
- ``functional.py``: the student, the model called with generated weights.
- ``finetune.py``: phase 2 (distillation or labels) and the student-vs-teacher measurement.
- ``objectives.py``: output kinds, distillation losses and fidelity metrics.
"""
