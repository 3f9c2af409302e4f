"""The generator file: one safetensors file that regenerates a whole network on its own.

Above :mod:`qtcompress.onnx` (it stores a weightless ONNX skeleton and rebuilds the graph) and
:mod:`qtcompress.io` (files on disk): ``file.py`` (:class:`GeneratorFile`, what a read file
can do), ``save.py`` (writing one), ``load.py`` (reading and checking one), ``metadata.py``
(its JSON description), ``storage.py`` (float16/int8 encodings of the stored values),
``hf_out.py`` (a Hugging Face folder written back). The public surface is
:meth:`qtcompress.api.QTModel.save` and :func:`qtcompress.load`.
"""
