"""Pieces every part of sparsecnn shares: the user-error type, atomic file output, ONNX I/O."""
