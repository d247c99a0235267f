"""From a model to files: CLI, ONNX export, data, fine-tuning, accuracy evaluation."""
