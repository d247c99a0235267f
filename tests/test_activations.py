"""Activation-sparsity profiler: zero fractions of every conv's input, the CLI and the plot."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecnn.converter.activations import conv_input_sparsity, load_profile_images
from sparsecnn.converter.cli import main
from sparsecnn.models import load_model


def test_profiler_agrees_with_module_hooks(exported):
    """The ONNX-executor profile equals zero fractions seen by forward hooks on the PyTorch model."""
    module, spec, _ = load_model("tinyresnet")
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = {}

    def hook(name):
        def fn(mod, args):
            x = args[0]
            seen.setdefault(name, []).extend((x == 0).reshape(x.shape[0], -1).float().mean(1).tolist())
        return fn

    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        module(images)
    rows = conv_input_sparsity(exported("tinyresnet"), images, batch_size=4)
    assert len(rows) == len(seen) == 9
    for r in rows:
        expect = seen[r["weight"].removesuffix(".weight")]
        assert r["images"] == 6 and len(r["per_image"]) == 6
        # BatchNorm is folded in the ONNX model: a value within rounding of 0 may flip
        assert np.allclose(r["per_image"], expect, atol=2e-3)
        assert abs(r["mean"] - np.mean(expect)) < 2e-3 and r["min"] <= r["mean"] <= r["max"]
    assert rows[0]["mean"] == 0.0  # the stem reads the image: no zeros
    assert all(r["mean"] > 0.2 for r in rows[1:])  # after ReLUs: many


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_images_load_for_a_model_spec():
    _, spec, _ = load_model("tinynet")
    x, what = load_profile_images("fashion-mnist", spec, limit=5)
    assert x.shape == (5, 3, 32, 32) and "Fashion-MNIST test" in what
    # Fashion-MNIST has a black background: the normalised minimum, (0 - 0.5)/0.5
    assert float(x.min()) == pytest.approx(-1.0) and float(x.max()) > 0


def test_cli_activations_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "act.png"
    assert main(["inspect", "tinynet", "--activations", "random", "--samples", "3", "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["images"] for r in out["layers"]] == [3, 3, 3]
    assert out["layers"][0]["mean"] == 0.0 and out["layers"][1]["mean"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_activations_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", "tinynet", "--activations", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["inspect", "tinynet", "--activations", "random", "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_flat_image_folder_loads(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (255 * (i % 2), 0, 0)).save(tmp_path / f"im{i}.png")
    _, spec, _ = load_model("tinynet")
    x, what = load_profile_images(str(tmp_path), spec, limit=2)
    assert x.shape == (2, 3, 32, 32) and "2 images" in what
