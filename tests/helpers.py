"""Small shared test utilities (independent of the code under test)."""
import re

import numpy as np
import onnx
import onnxruntime as ort
import torch


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the error measure of the project's tolerances."""
    a, b = (x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in (a, b))
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def input_shape(model: onnx.ModelProto, batch: int = 1) -> tuple[int, ...]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return (batch, *dims[1:])


# --- the CLI as a test drives it ----------------------------------------------------------------

def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `sparsecnn ARGV` run in this process."""
    from sparsecnn.converter.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def fails(capsys, *argv, match: str) -> str:
    """The one error line of a command that must exit 2 (no traceback), matching `match`."""
    code, out, err = cli(capsys, *argv)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert re.search(match, errors[0]), errors[0]
    return errors[0]


class Separable(torch.nn.Module):
    """stem -> depthwise 3x3 -> pointwise 1x1 -> depthwise 3x3 with channel multiplier 2 -> grouped 3x3 -> head:
    the conv kinds the pruning rules tell apart (stem and head dense, depthwise warned about)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.dw2 = torch.nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.grouped = torch.nn.Conv2d(32, 32, 3, padding=1, groups=4)  # grouped, not depthwise
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        x = self.grouped(self.dw2(self.pw(self.dw(self.stem(x)))))
        return self.head(x.mean((2, 3)))
