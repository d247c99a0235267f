"""ONNX -> ONNX passes: plain functions with counters (DESIGN contract 4)."""
from .graph import PassResult, check_model, run_pipeline

__all__ = ["PassResult", "check_model", "run_pipeline"]
