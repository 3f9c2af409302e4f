"""Files: the generator file and its container, pretrained model sources, arrays, atomic writes.

Nothing is imported here, so ``import qtcompress.io.atomic`` loads only what it needs.
"""
