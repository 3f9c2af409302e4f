"""Model inputs and outputs of any shape of call.

- ``batch.py``: :class:`Batch`, one mini-batch of positional and keyword inputs and labels.
- ``sources.py``: :class:`InputSource`, data in any accepted form, handed out as batches.
- ``model_call.py``: calling a model on a batch and picking the output to train on.
- ``layout.py``: :class:`BatchLayout`, inputs and outputs whose batch is not dimension 0.
"""
