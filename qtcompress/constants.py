"""Names and hard limits shared across qtcompress, with no heavy imports.

``import qtcompress.config`` (and anything that only validates settings) must not pull in torch,
Cirq or qsim; the values they need live here.
"""

from __future__ import annotations

MAX_QUBITS = 30
"""The simulator's hard ceiling on QNN qubits (memory may allow fewer)."""

ACTIVATION_NAMES = ("tanh", "gelu", "relu", "silu")
"""Activations of the mapping networks (see :data:`qtcompress.mapping.ACTIVATIONS`)."""

PROB_TRANSFORMS = ("scaled", "paper", "log", "none")
"""Transforms of the QNN probabilities into mapping inputs (see
:func:`qtcompress.mapping.transform_probs`)."""

HF_TASKS: dict[str, str] = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
}
"""``--task`` names (as in ``transformers.pipeline``) and the Auto class each builds (see
:mod:`qtcompress.io.hf_folder`)."""

TEXT_MAX_LENGTH = 128
"""Tokens per text example at most by default (:mod:`qtcompress.data.text`)."""
TEXT_TEST_FRACTION = 0.1
"""Share of a text data file held out to test when no test file is given."""
TEXT_SPLIT_SEED = 0
"""Seed of that held-out split."""
TEXT_COLUMN = "text"
"""The text's key or column in ``.jsonl`` / ``.csv`` data by default."""

# The training recipe's defaults, read by the CLI, the API (qtcompress.train.options) and the
# pipeline: one place. Measured on the suite of real-shaped models (docs/benchmarks.md).
FIT_STEPS = 100
"""Phase-1 steps (reproduce the pretrained weights)."""
FIT_LR = 1e-2
"""Phase-1 peak learning rate."""
FINETUNE_STEPS = 1500
"""Phase-2 steps (one mini-batch each)."""
# A model distilled over its own streams (rollouts) gets twice the steps: on the streaming
# voice-activity model (tools/bench_audio_stream.py) free-running agreement rose in all three
# paired runs, 93.0 -> 95.0% and 92.4 -> 93.3% (rollouts of 16, two seeds) and 90.3 -> 91.5%
# (rollouts of 8), at twice the time; every other model keeps 1,500.
STATEFUL_FINETUNE_STEPS = 3000
"""Phase-2 steps of a model distilled over rollouts of its training streams."""
BATCH_SIZE = 64
"""Phase-2 mini-batch size."""
# Rollouts of 16: on the streaming voice-activity model (tools/bench_audio_stream.py, seed 0)
# free-running agreement 89.6% at 4, 90-92% at 8, 93.0% at 16 and 93.5% at 32, each length
# costing about twice the fine-tune time of the one before.
ROLLOUT = 16
"""Chunks per phase-2 rollout of a model that carries state (with training streams)."""

# Phase-2 peak learning rate of the rows and flat schemes. At 1e-2 (the old default) a
# 390K-weight CNN without BatchNorm collapsed to a constant function; 3e-3 with warm-up and
# clipping is what the suite benchmark (docs/benchmarks.md) runs on all four real-shaped models.
# Each scheme registers its own default (generator/registry.py): the hashed scheme's is 1e-2.
DEFAULT_FINETUNE_LR = 3e-3
# What of a text model's token states is distilled, scored and exported
# (qtcompress.data.pooling); "masked" keeps every token with padding zeroed.
POOLINGS = ("mean", "max", "cls", "masked", "none")

# ONNX against torch: max |diff| <= ONNX_ATOL + ONNX_RTOL x max |output|. Float32 rounding
# grows with the outputs and with recurrence: a BiLSTM CTC model's logits (up to 16.1) differed
# by 2.7e-4 between onnxruntime and torch, 1.7e-5 of the output; a wrong export (a misplaced or
# transposed weight) differs by whole units.
ONNX_ATOL = 1e-5
ONNX_RTOL = 1e-4
