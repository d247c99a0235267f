"""Architectures sparsecnn knows, their input specs and default pruning exclusions."""
from .registry import MODELS, InputSpec, ModelEntry, get_entry, load_model, load_state_dict_file

__all__ = ["MODELS", "InputSpec", "ModelEntry", "get_entry", "load_model", "load_state_dict_file"]
