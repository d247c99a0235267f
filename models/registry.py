"""The model registry: how to build each architecture, load its weights, and feed it.

An entry carries its input spec (what `run` and the data loaders need to prepare images)
and the modules excluded from pruning by default (stem conv, classifier, detection heads):
those layers are small, sensitive, and for 2:4 often have too few input channels.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..common.errors import UserError
from ..common.onnxio import nonfinite_kind

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: pixels are scaled by `scale`, then (x - mean) / std per channel."""

    channels: int
    height: int
    width: int
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_name: str = "input"
    output_names: tuple[str, ...] = ("logits",)
    num_classes: int | None = None
    labels: tuple[str, ...] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "the stored input spec") -> "InputSpec":
        """The spec stored in a file (ONNX metadata, checkpoint), each field checked: a UserError naming `where`."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: the input spec is not a dict; re-export or retrain")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        for k in ("channels", "height", "width"):
            if k not in kw:
                raise UserError(f"{where}: the input spec has no '{k}'; re-export or retrain")
        try:
            spec = cls(**kw)
        except TypeError as exc:
            raise UserError(f"{where}: bad input spec ({exc})") from None
        spec._check(where)
        return spec

    def _check(self, where: str) -> None:
        def bad(what: str):
            return UserError(f"{where}: input spec {what}; re-export or retrain the model")

        def count(v, lo, hi):
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

        if not count(self.channels, 1, 4096):
            raise bad(f"channels {self.channels!r} is not an integer in [1, 4096]")
        for k in ("height", "width"):
            if not count(getattr(self, k), 1, 16384):
                raise bad(f"{k} {getattr(self, k)!r} is not an integer in [1, 16384]")
        if not _finite_number(self.scale) or self.scale <= 0:
            raise bad(f"scale {self.scale!r} is not a positive number")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, tuple) or len(v) != self.channels
                                  or not all(_finite_number(x) for x in v)):
                raise bad(f"{k} {v!r} is not {self.channels} finite numbers")
        if (self.mean is None) != (self.std is None):
            raise bad("has mean without std or std without mean")
        if self.std is not None and any(x <= 0 for x in self.std):
            raise bad(f"std {self.std!r} has a value <= 0")
        if self.num_classes is not None and not count(self.num_classes, 1, 10**6):
            raise bad(f"num_classes {self.num_classes!r} is not a positive integer")
        if self.labels is not None and (not isinstance(self.labels, tuple)
                                        or not all(isinstance(x, str) for x in self.labels)
                                        or (self.num_classes is not None and len(self.labels) != self.num_classes)):
            raise bad(f"labels are not {self.num_classes or 'some'} strings")
        if not isinstance(self.input_name, str) or not isinstance(self.output_names, tuple) or not all(
                isinstance(x, str) for x in self.output_names):
            raise bad("input or output names are not strings")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    build: Callable[[int], nn.Module]  # num_classes -> module with random weights
    input: InputSpec
    exclude: tuple[str, ...]  # module names left dense by default
    classifier: str | None = None  # module whose output size is the class count
    torchvision_builder: str | None = None  # torchvision.models function that knows its weights
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def spec_for(self, num_classes: int | None) -> InputSpec:
        if num_classes is None or num_classes == self.input.num_classes:
            return self.input
        return dataclasses.replace(self.input, num_classes=num_classes, labels=None)


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, num_classes=num_classes)

    return build


def _imagenet_torchvision(name: str, description: str, exclude: tuple[str, ...], classifier: str) -> ModelEntry:
    """A torchvision classifier at 224x224 with ImageNet normalisation; torchvision knows its weights."""
    return ModelEntry(name, description, _torchvision(name),
                      InputSpec(3, 224, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000),
                      exclude=exclude, classifier=classifier, torchvision_builder=name)


def _detectnet(num_classes: int) -> nn.Module:
    from .detectnet import DetectNetV2

    return DetectNetV2(num_classes)


def _tiny(kind: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from . import tiny

        if kind == "tinynet":
            return tiny.TinyNet(num_classes)
        if kind == "tinynet_odd":
            return tiny.TinyNet(num_classes, widths=(6, 10, 14))
        return tiny.TinyResNet(num_classes)

    return build


_TINY_INPUT = InputSpec(3, 32, 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_classes=10)

MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        _imagenet_torchvision("resnet18", "ResNet-18 (torchvision), 1000 ImageNet classes by default",
                              exclude=("conv1", "fc"), classifier="fc"),
        _imagenet_torchvision("resnet50", "ResNet-50 (torchvision, bottleneck blocks), 1000 ImageNet classes by "
                              "default", exclude=("conv1", "fc"), classifier="fc"),
        _imagenet_torchvision("vgg19", "VGG-19 without batch norm (torchvision), 1000 ImageNet classes by default",
                              exclude=("features.0", "classifier.6"), classifier="classifier.6"),
        ModelEntry(
            "trafficcamnet", "TrafficCamNet: DetectNet_v2 on ResNet-18 (layer4 at stride 1), 544x960",
            _detectnet,
            InputSpec(3, 544, 960, scale=1.0 / 255.0, input_name="input_1",
                      output_names=("output_cov/Sigmoid", "output_bbox/BiasAdd"),
                      num_classes=4, labels=("car", "bicycle", "person", "road_sign")),
            exclude=("conv1", "output_cov", "output_bbox"), classifier="output_cov",
            notes="NVIDIA's released weights (NGC, .etlt/.onnx) are not downloadable here; "
                  "random or user-trained weights are used."),
        ModelEntry("tinynet", "3-conv VGG-like test net, 32x32", _tiny("tinynet"), _TINY_INPUT,
                   exclude=("features.0", "classifier"), classifier="classifier"),
        ModelEntry("tinynet_odd", "tinynet with 6/10/14 channels (not multiples of 4)", _tiny("tinynet_odd"),
                   _TINY_INPUT, exclude=("features.0", "classifier"), classifier="classifier"),
        ModelEntry("tinyresnet", "small residual test net with strided shortcuts, 32x32", _tiny("tinyresnet"),
                   _TINY_INPUT, exclude=("conv1", "fc"), classifier="fc"),
    ]
}


def get_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(MODELS)} "
                        "(or give a path to an .onnx file or a sparsecnn checkpoint)") from None


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Load a checkpoint as plain data (weights_only=True) and return its tensor dict.

    Accepts a bare state dict or a dict holding one under 'state_dict' / 'model'
    (sparsecnn's own checkpoints also carry 'arch', 'num_classes' and 'input').
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a folder; give a checkpoint file (a state dict saved with torch.save), a "
                        "registry model name or an .onnx file")
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()[0] if "Weights only load failed" not in str(exc) else ""
        raise UserError(
            f"{p} is not a plain state dict: it holds Python objects that sparsecnn will not unpickle "
            f"(weights_only=True){'; ' + detail if detail else ''}. Save it with "
            "torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UserError(f"{p} is corrupt or truncated and cannot be read as a PyTorch checkpoint "
                        f"({type(exc).__name__}); save it again") from None
    except Exception as exc:  # noqa: BLE001 - a file that is no checkpoint (text, an image) fails in pickle's
        # own way (KeyError, IndexError, UnicodeDecodeError, ...): the file is at fault, not sparsecnn
        raise UserError(f"{p} is not a PyTorch checkpoint (torch.load: {type(exc).__name__}); give a state dict "
                        "saved with torch.save(model.state_dict(), path)") from None
    return obj


def _tensor_dict(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path} does not hold a state dict (a dict of parameter names to tensors)")
    for k, v in state.items():
        bad = nonfinite_kind(v) if v.is_floating_point() else None
        if bad:
            raise UserError(f"{path}: tensor '{k}' holds {bad} values; fix or retrain the model")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model(name: str, weights: str | None = None, num_classes: int | None = None,
               seed: int = 0) -> tuple[nn.Module, InputSpec, ModelEntry]:
    """Build registry model `name` in eval mode and load `weights`.

    `weights` is a state-dict / checkpoint file, a torchvision weights name (e.g.
    IMAGENET1K_V1, needs the internet once), or None for seeded random weights.
    """
    entry = get_entry(name)
    state = None
    if weights and (os.sep in weights or Path(weights).suffix in {".pt", ".pth", ".ckpt", ".bin"} or Path(weights).exists()):
        obj = load_state_dict_file(weights)
        state = _tensor_dict(obj, weights)
        stored = obj.get("num_classes") if isinstance(obj, dict) else None
        if stored is not None:
            if not isinstance(stored, int) or isinstance(stored, bool) or stored < 1:
                raise UserError(f"{weights}: stored num_classes {stored!r} is not a positive integer; "
                                "save the checkpoint again")
            if num_classes is not None and num_classes != stored:
                raise UserError(f"{weights} has {stored} classes, not --num-classes {num_classes}")
            num_classes = stored
        if num_classes is None and entry.classifier and f"{entry.classifier}.weight" in state:
            num_classes = int(state[f"{entry.classifier}.weight"].shape[0])
    torch.manual_seed(seed)
    model = entry.build(num_classes or entry.input.num_classes)
    spec = entry.spec_for(num_classes)
    if state is not None:
        _load_into(model, state, weights)
        if isinstance(obj, dict) and obj.get("input") is not None:
            spec = InputSpec.from_dict(obj["input"], f"{weights}")
            if spec.num_classes is not None and spec.num_classes != (num_classes or entry.input.num_classes):
                raise UserError(f"{weights}: its input spec says {spec.num_classes} classes, the model has "
                                f"{num_classes or entry.input.num_classes}; save the checkpoint again")
            if spec.channels != entry.input.channels:
                raise UserError(f"{weights}: its input spec says {spec.channels} channels, {entry.name} takes "
                                f"{entry.input.channels}; save the checkpoint again")
    elif weights:
        categories = _load_torchvision_weights(entry, model, weights, num_classes)
        spec = dataclasses.replace(spec, num_classes=len(categories), labels=tuple(categories))
    return model.eval(), spec, entry


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"shape mismatch {wrong[0]}")
        raise UserError(f"{path} does not fit this architecture: " + "; ".join(parts)
                        + " (is --num-classes or the model name right?)")
    model.load_state_dict(state)


def _load_torchvision_weights(entry: ModelEntry, model: nn.Module, weights: str, num_classes: int | None) -> list[str]:
    """Load torchvision's weights `weights` into `model`; returns their class names (`run` prints them)."""
    if not entry.torchvision_builder:
        raise UserError(f"model '{entry.name}' has no torchvision weights; give a state-dict file with --weights")
    import torchvision.models as tvm

    try:
        w = tvm.get_model_weights(entry.torchvision_builder)[weights]
    except KeyError:
        known = ", ".join(x.name for x in tvm.get_model_weights(entry.torchvision_builder))
        raise UserError(f"'{weights}' is neither a file nor a torchvision weights name for "
                        f"{entry.name} (known: {known}, DEFAULT)") from None
    if num_classes not in (None, len(w.meta["categories"])):
        raise UserError(f"{weights} has {len(w.meta['categories'])} classes, not {num_classes}")
    try:
        state = w.get_state_dict(progress=False)
    except Exception as exc:  # urllib / ssl / socket errors when offline
        raise UserError(f"could not download torchvision weights {weights} ({type(exc).__name__}); "
                        "without internet, pass a state-dict file with --weights") from None
    model.load_state_dict(state)
    return list(w.meta["categories"])
