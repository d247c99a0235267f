"""Issue 4: data, masked fine-tuning, gradual and channel pruning, `train` and `compare` (CPU, small)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import initializers, ort_run
from sparsecnn.common.errors import UserError
from sparsecnn.converter import data as data_mod
from sparsecnn.converter.data import TensorImages, augment_uint8, fashion_mnist_spec, load_data
from sparsecnn.converter.export import export_onnx
from sparsecnn.converter.finetune import BatchNormScaffold, FitConfig, GradualPruning, Masker, fit, make_optimizer
from sparsecnn.models import load_model

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="apt-get install -y dataset-fashion-mnist")


def random_images(n=96, seed=0, classes=10) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, classes, (n,), generator=g), name="random", num_classes=classes)


def random_masks(model: nn.Module, keep: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < keep for n, p in model.named_parameters()
            if n.endswith(".weight") and p.dim() in (2, 4)}


# --- masked fine-tuning ----------------------------------------------------------------------

@pytest.mark.parametrize("opt", [dict(optimizer="sgd", momentum=0.9, weight_decay=5e-2, lr=0.1),
                                 dict(optimizer="adamw", weight_decay=0.5, lr=0.01)])
def test_masked_weights_stay_exactly_zero_through_every_step(opt):
    torch.manual_seed(0)
    model, _, _ = load_model("tinyresnet")
    model.train()
    masks = random_masks(model)
    masker = Masker(model, masks)
    masker.apply()
    cfg = FitConfig(**opt)
    optimizer = make_optimizer(model, cfg)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in masks}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        masker.zero_grads()
        optimizer.step()
        masker.after_step(optimizer)
        for n, m in masks.items():
            assert torch.count_nonzero(params[n].detach()[~m]) == 0, n
            for buf in optimizer.state[params[n]].values():  # momentum / exp_avg / exp_avg_sq
                if isinstance(buf, torch.Tensor) and buf.shape == m.shape:
                    assert torch.count_nonzero(buf[~m]) == 0, n
    # the kept weights did train
    assert all(not torch.equal(params[n].detach()[m], before[n][m]) for n, m in masks.items())


def test_without_the_masker_the_same_steps_revive_pruned_weights():
    """Control for the test above: momentum and weight decay do move zeroed weights."""
    torch.manual_seed(0)
    model, _, _ = load_model("tinyresnet")
    model.train()
    masks = random_masks(model)
    Masker(model, masks).apply()
    optimizer = make_optimizer(model, FitConfig(optimizer="sgd", momentum=0.9, weight_decay=5e-2, lr=0.1))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert sum(int(torch.count_nonzero(params[n].detach()[~m])) for n, m in masks.items()) > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fit_with_masks_keeps_zeros_and_they_survive_export_with_bn_folding(optimizer):
    torch.manual_seed(0)
    model, _, entry = load_model("tinyresnet")
    masks = random_masks(model, keep=0.4, seed=1)
    spec = fashion_mnist_spec(32)
    cfg = FitConfig(epochs=2, batch_size=32, lr=0.05 if optimizer == "sgd" else 0.01, optimizer=optimizer,
                    weight_decay=0.05, patience=1)
    res = fit(model, random_images(96), random_images(32, seed=1), spec, "cpu", cfg, masks=masks, progress=False,
              log=lambda s: None)
    assert res.epochs_run >= 1
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.count_nonzero(params[n].detach()[~m]) == 0
    # BN running statistics moved, so folding rescales every kept weight; zeros must stay zeros
    exported = initializers(export_onnx(model, spec, entry.exclude))
    for n, m in masks.items():
        w = exported[n]
        assert np.count_nonzero(w[~m.numpy()]) == 0, n
        assert np.count_nonzero(w[m.numpy()]) == int(m.sum()), n


def test_gradual_pruning_reaches_the_target_per_layer_along_a_rising_schedule():
    torch.manual_seed(0)
    model, _, entry = load_model("tinynet")
    spec = fashion_mnist_spec(32)
    cfg = FitConfig(epochs=3, batch_size=32, lr=0.05)
    res = fit(model, random_images(96), random_images(32, seed=1), spec, "cpu", cfg,
              gradual=GradualPruning(0.8, end_epoch=2, exclude=entry.exclude), progress=False, log=lambda s: None)
    sparsities = [h["sparsity"] for h in res.history]
    assert sparsities[0] < sparsities[1] <= sparsities[2]
    assert sparsities[-1] == pytest.approx(0.8, abs=1e-3)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.dim() == 4 and not name.startswith("features.0"):
            assert int((p == 0).sum()) == round(0.8 * p.numel()), name
    assert torch.count_nonzero(model.features[0].weight == 0) == 0  # the stem is excluded


def plain_vgg_like(seed: int = 0) -> nn.Module:
    """A BatchNorm-free conv net (the form VGG-19 has after its BatchNorms are folded)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_batchnorm_scaffold_starts_as_the_identity_and_folds_back_to_the_same_function():
    model = plain_vgg_like()
    names = sorted(model.state_dict())
    x = torch.randn(16, 3, 12, 12)
    before = model.eval()(x).detach()
    scaffold = BatchNormScaffold(model, torch.randn(32, 3, 12, 12))
    assert torch.allclose(model.eval()(x), before, rtol=1e-4, atol=1e-5)
    # train a few steps: the scaffold's statistics and affine parameters move
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 3, 12, 12)).square().mean().backward()
        opt.step()
    trained = model.eval()(x).detach()
    assert not torch.allclose(trained, before, atol=1e-3)
    scaffold.fold()
    assert sorted(model.state_dict()) == names
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model.eval()(x), trained, rtol=1e-4, atol=1e-5)


def test_fit_with_the_scaffold_prunes_gradually_and_returns_the_plain_net_with_exact_zeros():
    model = plain_vgg_like()
    names = sorted(model.state_dict())
    spec = fashion_mnist_spec(16)
    cfg = FitConfig(epochs=2, batch_size=32, lr=0.05, batchnorm_scaffold=True)
    fit(model, random_images(96), random_images(32, seed=1), spec, "cpu", cfg,
        gradual=GradualPruning(0.75, end_epoch=1, exclude=("0", "9")), progress=False, log=lambda s: None)
    assert sorted(model.state_dict()) == names
    for i in (2, 5):
        w = model[i].weight
        assert int((w == 0).sum()) == round(0.75 * w.numel()), i
    assert torch.count_nonzero(model[0].weight == 0) == 0  # excluded


# --- one rule for torch and ONNX ---------------------------------------------------------------

def test_module_masks_pick_the_same_weights_as_the_onnx_pass_after_bn_folding():
    from sparsecnn.passes.masks import module_masks
    from sparsecnn.passes.prune import prune_unstructured

    torch.manual_seed(0)
    model, spec, entry = load_model("tinyresnet")
    for m in model.modules():  # BN scales that differ per channel change the ranking
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 3.0)
            m.running_var.uniform_(0.5, 2.0)
    masks, counters = module_masks(model, "unstructured", 0.7, "layer", entry.exclude)
    pruned = initializers(prune_unstructured(export_onnx(model, spec, entry.exclude), 0.7).model)
    assert counters["pruned"] == len(masks) == 8
    for n, m in masks.items():
        assert np.array_equal(pruned[n] != 0, m.numpy()), n
    raw, _ = module_masks(model, "unstructured", 0.7, "layer", entry.exclude, fold_bn=False)
    assert any(not torch.equal(raw[n], masks[n]) for n in masks)  # folding mattered here


# --- channel pruning ---------------------------------------------------------------------------

def test_channel_pruning_halves_flops_and_the_smaller_model_matches_its_onnx_export(exported):
    pytest.importorskip("torch_pruning")
    from sparsecnn.passes.channel import count_flops, prune_channels

    torch.manual_seed(0)
    model, spec, entry = load_model("tinyresnet")
    x = torch.randn(4, *spec.shape)
    res = prune_channels(model, x[:1], 0.5, entry.exclude)
    small = res.module.eval()
    flops_dense, params_dense = count_flops(model, x[:1])
    flops_small, params_small = count_flops(small, x[:1])
    assert 0.4 <= flops_small / flops_dense <= 0.53
    assert params_small < params_dense
    assert small.conv1.out_channels == 16 and small.fc.out_features == 10  # excluded layers keep their outputs
    assert small.layer3.conv1.out_channels < 64
    assert all(c % 8 == 0 for c in (small.layer2.conv1.out_channels, small.layer3.conv1.out_channels))
    onnx_small = export_onnx(small, spec, entry.exclude)
    assert onnx_small.ByteSize() < 0.7 * exported("tinyresnet").ByteSize()
    with torch.no_grad():
        want = small(x).numpy()
    got = ort_run(onnx_small, x.numpy())[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert model.layer3.conv1.out_channels == 64  # the original is untouched


# --- export of VGG at small inputs ---------------------------------------------------------------

def test_adaptive_pool_from_a_1x1_map_exports_and_matches():
    from sparsecnn.models.registry import InputSpec

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(8), nn.AdaptiveAvgPool2d(3),
                        nn.Flatten(), nn.Linear(72, 5)).eval()
    spec = InputSpec(3, 8, 8)
    model = export_onnx(net, spec)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x).numpy()
    assert np.abs(ort_run(model, x.numpy())[0] - want).max() < 1e-5
    assert isinstance(net[3], nn.AdaptiveAvgPool2d)  # restored after export


def test_batchnorm_folded_into_the_plain_network_computes_the_same():
    from sparsecnn.converter.finetune import fold_batchnorm_into

    torch.manual_seed(0)
    trained = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8 * 16, 4))
    for m in trained:
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 4))
    fold_batchnorm_into(trained.eval(), plain)
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(plain(x), trained(x), atol=1e-5)


# --- data ----------------------------------------------------------------------------------------

def test_missing_fashion_mnist_is_a_user_error_saying_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv(data_mod.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(UserError, match="apt-get install -y dataset-fashion-mnist"):
        load_data(None, "test")
    with pytest.raises(UserError, match="ImageFolder"):
        load_data(str(tmp_path / "missing-folder"), "test")


def test_image_folder_is_labelled_by_sub_folder(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 30), ("dog", 220)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_data(str(tmp_path), "test")
    assert ds.num_classes == 2 and len(ds) == 6 and ds.labels == ("cat", "dog")
    spec = fashion_mnist_spec(16)
    x, y = next(ds.batches(spec, 6))
    assert x.shape == (6, 3, 16, 16)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(x[0].mean()) < float(x[5].mean())  # dark images are class 0


def test_augmentation_shifts_by_at_most_2_pixels_and_may_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8)
    out = augment_uint8(x, torch.Generator().manual_seed(1))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    flips = 0
    for i in range(len(x)):
        found = None
        for dy in range(5):
            for dx in range(5):
                crop = padded[i, :, dy:dy + 28, dx:dx + 28]
                if np.array_equal(out[i].numpy(), crop):
                    found = "plain"
                elif np.array_equal(out[i].numpy(), crop[..., ::-1]):
                    found = "flip"
        assert found, i
        flips += found == "flip"
    assert 5 < flips < 35


def test_coverage_agreement_counts_cells_on_the_same_side_of_the_threshold():
    from sparsecnn.converter.accuracy import coverage_agreement

    ref = torch.tensor([[[[0.9, 0.1], [0.6, 0.2]]]])
    cov = torch.tensor([[[[0.8, 0.7], [0.4, 0.2]]]])
    m = coverage_agreement(cov, ref, 0.5)
    assert m["cell_agreement"] == pytest.approx(50.0)
    assert m["positive_cell_agreement"] == pytest.approx(100.0 / 3)
    assert m["mean_abs_diff"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.0) / 4)


# --- the commands on real data -------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """Independent reader of the idx format (big-endian header, then uint8 data)."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_fmnist
@pytest.mark.slow
def test_train_then_compare_on_a_fashion_mnist_subset_prints_real_numbers(tmp_path, capsys):
    pytest.importorskip("torch_pruning")
    from sparsecnn.converter.cli import main

    ckpt = tmp_path / "tiny.pt"
    assert main(["train", "tinynet", "-o", str(ckpt), "--device", "cpu", "--subset", "800", "--epochs", "2",
                 "--eval-subset", "200", "--no-progress"]) == 0
    obj = torch.load(ckpt, weights_only=True)
    assert obj["arch"] == "tinynet" and obj["input"]["height"] == 32 and obj["train"]["train_images"] == 800
    capsys.readouterr()
    out_json = tmp_path / "c.json"
    code = main(["compare", str(ckpt), "--device", "cpu", "--subset", "200", "--finetune-epochs", "1",
                 "--train-subset", "300", "--methods", "2:4", "0.8", "channel:0.5", "--no-progress",
                 "--json", str(out_json), "--plot", str(tmp_path / "c.png")])
    printed = capsys.readouterr().out
    assert code == 0
    res = json.loads(out_json.read_text(encoding="utf-8"))["results"][0]
    rows = {(r["method"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {("dense", "-"), ("2:4", "one-shot"), ("2:4", "fine-tuned"),
                         ("unstructured 80%", "one-shot"), ("unstructured 80%", "gradual+fine-tuned"),
                         ("channel -50% FLOPs", "one-shot"), ("channel -50% FLOPs", "fine-tuned")}
    # dense top-1 recomputed independently: own idx reader, own preprocessing, plain torch
    images = _read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:200]
    labels = _read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:200]
    model, _, _ = load_model("tinynet", str(ckpt))
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - 0.2860) / 0.3530
    with torch.no_grad():
        top1 = 100.0 * float((model(x).argmax(1).numpy() == labels).mean())
    assert rows[("dense", "-")]["top1"] == pytest.approx(top1, abs=0.51)
    assert top1 > 30.0  # trained, not chance
    assert rows[("dense", "-")]["agree_top1"] == 100.0 and rows[("dense", "-")]["cosine"] == pytest.approx(1.0)
    assert rows[("2:4", "fine-tuned")]["masks_survive"] and rows[("2:4", "fine-tuned")]["two_four_layers"] == 2
    assert rows[("unstructured 80%", "gradual+fine-tuned")]["masks_survive"]
    assert rows[("unstructured 80%", "gradual+fine-tuned")]["prunable_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert rows[("channel -50% FLOPs", "one-shot")]["onnx_bytes"] < rows[("dense", "-")]["onnx_bytes"]
    assert rows[("channel -50% FLOPs", "one-shot")]["flops_ratio"] <= 0.55
    assert rows[("unstructured 80%", "one-shot")]["compressed_bytes"] < rows[("dense", "-")]["onnx_bytes"]
    for r in rows.values():  # the printed table carries the JSON's numbers
        assert f"{r['top1']:.2f}" in printed
        assert r.get("onnx_vs_torch") is None or r["onnx_vs_torch"] < 1e-4
    assert (tmp_path / "c.png").stat().st_size > 10_000
