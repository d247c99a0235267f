"""What pruning costs in accuracy, per method, one-shot and after fine-tuning (`sparsecnn compare`).

For each method (2:4, unstructured magnitude, channel) the model is pruned one-shot and,
where labelled training data and the PyTorch model are at hand, fine-tuned with masks
(unstructured: pruned gradually with the cubic schedule while training). Every variant is
exported to ONNX (BatchNorm folded) and evaluated through that file on a runtime (torch by
default) - the form users deploy - on labelled data (top-1, top-5) and against the dense
model's outputs (top-1 agreement, output cosine; coverage-map agreement for detectors).
Each fine-tuned export is checked: every weight that is zero in the torch model is still
zero in the ONNX file after BatchNorm folding. Sizes: the ONNX file, and the compressed
form (CSR for unstructured, 2:4 values + 2-bit indices, the smaller ONNX for channel).

Under torchrun every rank runs the comparison: fine-tuning is data-parallel (finetune.fit),
each variant's outputs are computed on each rank's share of the images and gathered in
order, so every rank scores the whole set exactly once; rank 0 alone logs and writes files.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..common.errors import UserError
from ..common.fileio import write_text_atomic
from ..common.onnxio import save_onnx
from ..models.registry import InputSpec
from ..passes.graph import run_pipeline
from ..passes.masks import check_sparsity, is_2to4
from ..passes.prune import prune_2to4, prune_unstructured
from . import distributed
from .accuracy import is_classifier_output, metrics, model_sizes, predict
from .data import ImageData, TensorImages, load_data
from .figures import save_figure
from .finetune import GRADUAL_SHARE, FitConfig, GradualPruning, fit


@dataclass(frozen=True)
class Method:
    kind: str                 # "2:4" | "unstructured" | "channel"
    amount: float | None = None  # unstructured: sparsity; channel: fraction of FLOPs removed

    @property
    def label(self) -> str:
        if self.kind == "unstructured":
            return f"unstructured {self.amount:.0%}"
        if self.kind == "channel":
            return f"channel -{self.amount:.0%} FLOPs"
        return self.kind


def parse_methods(tokens: list[str]) -> list[Method]:
    """'2:4', '0.9' or 'unstructured:0.9', 'channel' or 'channel:0.5' (fraction of FLOPs removed)."""
    out = []
    for tok in tokens:
        t = tok.strip().lower()
        if t == "2:4":
            out.append(Method("2:4"))
            continue
        kind, _, value = t.partition(":")
        if kind == "channel":
            try:
                amount = float(value) if value else 0.5
            except ValueError:
                amount = float("nan")
            if not 0.0 < amount < 1.0:
                raise UserError(f"channel pruning takes the fraction of FLOPs to remove in (0, 1), e.g. channel:0.5; "
                                f"got '{tok}'")
            out.append(Method("channel", amount))
            continue
        try:
            amount = float(value if kind == "unstructured" else t)
        except ValueError:
            raise UserError(f"unknown method '{tok}'; use 2:4, a sparsity such as 0.9 (unstructured), "
                            "or channel:0.5 (remove half the FLOPs)") from None
        out.append(Method("unstructured", check_sparsity(amount)))
    if not out:
        raise UserError("give at least one method with --methods")
    return out


@dataclass
class FinetunePlan:
    """How each method is fine-tuned: a base FitConfig and epochs per method kind."""

    fit: FitConfig
    epochs: dict[str, int] = field(default_factory=lambda: {"2:4": 5, "unstructured": 12, "channel": 10})
    lr_scale: dict[str, float] = field(default_factory=lambda: {"2:4": 1.0, "unstructured": 2.5, "channel": 2.5})
    prune_fraction: float = GRADUAL_SHARE  # gradual pruning ramps over this share of the unstructured epochs
    scope: str = "layer"

    def config(self, kind: str) -> FitConfig:
        return dataclasses.replace(self.fit, epochs=self.epochs[kind], lr=self.fit.lr * self.lr_scale.get(kind, 1.0))


@dataclass
class Subject:
    """The model under comparison: its torch module (None for an ONNX file) and dense ONNX export."""

    label: str
    spec: InputSpec
    exclude: tuple[str, ...]
    module: nn.Module | None
    dense_onnx: onnx.ModelProto
    arch: str | None = None


def load_subject(source: str, weights: str | None = None, num_classes: int | None = None, opset: int = 17,
                 quiet: bool = False, flags=None) -> Subject:
    """The model to compare; `flags` (source.SpecFlags) give or override its input spec."""
    from ..common.onnxio import set_input_spec
    from ..models.registry import get_entry, load_model
    from .export import export_onnx
    from .source import SpecFlags, checkpoint_arch, load_source, spec_with_flags, stage

    flags = flags or SpecFlags()
    path = Path(source)
    if source.endswith(".onnx"):
        src = load_source(source, quiet=quiet, flags=flags)
        spec = src.input.require_spec()
        set_input_spec(src.model, spec.to_dict())  # the variants written with --save-dir carry it
        return Subject(src.label, spec, (), None, src.model)
    arch = source
    if path.suffix in {".pt", ".pth", ".ckpt"} or path.is_file():
        arch = checkpoint_arch(source)
        if arch is None:
            raise UserError(f"{source} is a checkpoint without an architecture name; give the model and the "
                            f"file separately: `sparsecnn compare resnet18 --weights {source}`")
        weights = source
    entry = get_entry(arch)
    with stage(f"building {arch}" + (f" with weights {weights}" if weights else " (random weights, seed 0)"), quiet):
        module, spec, entry = load_model(arch, weights, num_classes)
    spec = spec_with_flags(spec, flags, arch)
    with stage(f"exporting {arch} to ONNX (opset {opset}, BatchNorm folded)", quiet):
        dense = export_onnx(module, spec, entry.exclude, opset)
    return Subject(Path(weights).stem if weights and Path(weights).is_file() else arch, spec, entry.exclude,
                   module, dense, arch)


@contextlib.contextmanager
def _strict_fp32():
    """No TF32 for the torch-vs-ONNX check (the engine runs strict fp32 too)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


class _Evaluator:
    """Runs ONNX variants on a runtime over one data set and scores them against the dense model."""

    def __init__(self, subject: Subject, data: ImageData, device: torch.device, runtime: str, batch_size: int,
                 cov_threshold: float, progress: bool):
        from ..runtimes import require_runtime

        self.subject, self.data, self.device = subject, data, device
        self.rt = require_runtime(runtime)
        self.batch_size, self.cov_threshold, self.progress = batch_size, cov_threshold, progress
        self.reference: list[torch.Tensor] | None = None
        self.labels: torch.Tensor | None = None
        self.use_labels = False
        self.output_names: list[str] = list(subject.spec.output_names)
        self.check_batch = None

    def outputs(self, model: onnx.ModelProto, desc: str) -> tuple[list[torch.Tensor], object]:
        from ..runtimes import compile_engine

        opts = {"dtype": "fp32", "tf32": False, "cuda_graph": self.device.type == "cuda"}
        engine = compile_engine(self.rt, self.rt.rewrite(model, opts), self.device, opts)
        self.output_names = list(engine.output_names)
        share = self.data.shard(distributed.rank(), distributed.world_size())
        outs, labels = predict(engine, share, self.subject.spec, self.device, self.batch_size,
                               progress=self.progress, desc=desc)
        outs, labels = [distributed.all_gather_cat(o) for o in outs], distributed.all_gather_cat(labels)
        if self.labels is None:
            self.labels = labels
        return outs, engine

    def score(self, outs: list[torch.Tensor]) -> dict:
        return metrics(outs, self.labels if self.use_labels else None, self.reference, self.output_names,
                       self.cov_threshold)

    def torch_vs_onnx(self, module: nn.Module | None, engine) -> float | None:
        """max |torch - ONNX| / max |torch| of the first output on one batch: the export is faithful."""
        if module is None:
            return None
        if self.check_batch is None:
            x, _ = next(self.data.batches(self.subject.spec, min(32, len(self.data)), self.device))
            self.check_batch = x
        x = self.check_batch
        module = module.to(self.device).eval()
        with torch.no_grad(), _strict_fp32():
            ref = module(x)
            got = engine(x)
        ref = (ref if isinstance(ref, (tuple, list)) else (ref,))[0].float()
        return float((got[0].to(ref.device) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _masks_from_onnx(model: onnx.ModelProto, module: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks for the module's weights from a pruned ONNX file's zeros (weight names match by export)."""
    from ..passes.graph import initializer_map
    from ..passes.prune import prunable_weights

    inits = initializer_map(model)
    params = dict(module.named_parameters())
    masks = {}
    for _, name, _ in prunable_weights(model):
        if name in params:
            arr = torch.from_numpy(onnx.numpy_helper.to_array(inits[name]).copy())
            if arr.shape == params[name].shape:
                masks[name] = arr != 0
    return masks


def check_masks_survive(module: nn.Module, exported: onnx.ModelProto, names) -> dict:
    """Every weight that is zero in `module` must be zero in the exported (BN-folded) ONNX file."""
    from ..passes.graph import initializer_map

    inits = initializer_map(exported)
    params = dict(module.named_parameters())
    lost, checked, zeros = [], 0, 0
    for name in names:
        if name not in inits or name not in params:
            lost.append(f"{name} (not in the export)")
            continue
        w = torch.from_numpy(onnx.numpy_helper.to_array(inits[name]).copy())
        z = params[name].detach().cpu() == 0
        checked += 1
        zeros += int(z.sum())
        if w.shape != z.shape or bool((w[z] != 0).any()):
            lost.append(name)
    return {"masks_survive": not lost, "layers_checked": checked, "zeros_checked": zeros, "layers_lost": lost}


def _row(method: str, variant: str, model: onnx.ModelProto, form: str, dense_weights: int, scores: dict,
         **extra) -> dict:
    sizes = model_sizes(model, form)
    return {"method": method, "variant": variant,
            "sparsity": 1.0 - sizes["nonzero_weights"] / max(1, dense_weights), **sizes, **scores, **extra}


def compare_model(subject: Subject, methods: list[Method], data: ImageData, device: torch.device | str, *,
                  train: ImageData | None = None, val: ImageData | None = None, plan: FinetunePlan | None = None,
                  runtime: str = "torch", batch_size: int = 250, cov_threshold: float = 0.5,
                  save_dir: str | Path | None = None, progress: bool = True, log=print,
                  on_row=None) -> dict:
    """Dense vs each method one-shot vs fine-tuned; returns the results (rows + notes), JSON-ready.

    `on_row(results)` is called after every row, so a caller can save partial results.
    """
    device = torch.device(device)
    spec = subject.spec
    if not distributed.is_main():
        progress, on_row, save_dir = False, None, None
    log = distributed.main_only(log)
    ev = _Evaluator(subject, data, device, runtime, batch_size, cov_threshold, progress)
    results = {"model": subject.label, "arch": subject.arch, "input": spec.to_dict(), "data": data.name,
               "images": len(data), "device": str(device), "runtime": runtime, "rows": [], "notes": []}
    save = Path(save_dir) if save_dir else None
    if save:
        save.mkdir(parents=True, exist_ok=True)

    def add(row: dict) -> None:
        results["rows"].append(row)
        log(_one_line(row))
        if on_row:
            on_row(results)

    def saved(model: onnx.ModelProto, name: str) -> str | None:
        if not save:
            return None
        path = save / f"{subject.label}-{name}.onnx"
        save_onnx(model, path)
        return str(path)

    t0 = time.perf_counter()
    dense_outs, engine = ev.outputs(subject.dense_onnx, "dense")
    classifier = is_classifier_output(dense_outs)
    ev.use_labels = classifier and data.labels is not None and dense_outs[0].shape[1] == data.num_classes
    results["has_labels"] = ev.use_labels
    results["output"] = "classifier" if classifier else "detector"
    if classifier and not ev.use_labels:
        results["notes"].append(f"the model has {dense_outs[0].shape[1]} classes, the data {data.num_classes}: "
                                "label-free agreement with the dense model only")
    ev.reference = dense_outs
    dense_weights = model_sizes(subject.dense_onnx, "dense")["weights"]
    add(_row("dense", "-", subject.dense_onnx, "dense", dense_weights, ev.score(dense_outs),
             onnx_vs_torch=ev.torch_vs_onnx(subject.module, engine), flops_ratio=1.0,
             file=saved(subject.dense_onnx, "dense"), seconds=time.perf_counter() - t0))
    del engine

    can_finetune, why_not = _can_finetune(subject, ev, train, plan)
    if not can_finetune and plan is not None:
        results["notes"].append(f"fine-tuning skipped: {why_not}")
    if can_finetune and isinstance(train, TensorImages) and device.type == "cuda":
        train = train.to(device)
        val = val.to(device) if isinstance(val, TensorImages) else val

    for method in methods:
        try:
            _compare_method(method, subject, ev, dense_weights, add, saved, device, train, val, plan,
                            can_finetune, progress, log)
        except (UserError, RuntimeError, ValueError) as exc:  # one method failing must not lose the others
            if distributed.is_distributed():
                raise  # other ranks may be inside a collective: stop the job rather than go on out of step
            add({"method": method.label, "variant": "error", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["seconds"] = time.perf_counter() - t0
    return results


def _can_finetune(subject: Subject, ev: _Evaluator, train: ImageData | None, plan: FinetunePlan | None):
    if plan is None:
        return False, "not asked for"
    if subject.module is None:
        return False, "an ONNX file has no trainable PyTorch model; compare its checkpoint instead"
    if not ev.use_labels:
        return False, "needs labelled data whose classes match the model's (detectors and foreign labels get one-shot numbers)"
    if train is None or len(train) == 0:
        return False, "no training data"
    return True, ""


def _compare_method(method: Method, subject: Subject, ev: _Evaluator, dense_weights: int, add, saved,
                    device: torch.device, train, val, plan, can_finetune: bool, progress: bool, log) -> None:
    spec = subject.spec
    label = method.label
    tag = label.replace(" ", "").replace(":", "to").replace("%", "").replace("-", "minus")
    if method.kind in ("2:4", "unstructured"):
        form = "2:4" if method.kind == "2:4" else "csr"
        t0 = time.perf_counter()
        pipeline = [(prune_2to4, {})] if method.kind == "2:4" else \
            [(prune_unstructured, {"sparsity": method.amount, "scope": plan.scope if plan else "layer"})]
        pruned, passes = run_pipeline(subject.dense_onnx, pipeline)
        outs, engine = ev.outputs(pruned, f"{label} one-shot")
        add(_row(label, "one-shot", pruned, form, dense_weights, ev.score(outs), flops_ratio=None,
                 passes=passes[0].summary(), file=saved(pruned, f"{tag}-oneshot"), seconds=time.perf_counter() - t0))
        del engine
        if not can_finetune:
            return
        t0 = time.perf_counter()
        model = copy.deepcopy(subject.module)
        cfg = plan.config(method.kind)
        if method.kind == "2:4":
            masks = _masks_from_onnx(pruned, model)
            res = fit(model, train, val, spec, device, cfg, masks=masks, label=f"{label} fine-tune",
                      progress=progress, log=log)
            names = list(masks)
            variant = "fine-tuned"
        else:
            gradual = GradualPruning(method.amount, end_epoch=plan.prune_fraction * cfg.epochs,
                                     scope=plan.scope, exclude=subject.exclude)
            from ..passes.masks import module_weights

            names = list(module_weights(model, subject.exclude))
            res = fit(model, train, val, spec, device, cfg, gradual=gradual, label=f"{label} gradual",
                      progress=progress, log=log)
            variant = "gradual+fine-tuned"
        _finetuned_row(label, variant, model, names, subject, ev, form, dense_weights, res, cfg, add, saved,
                       f"{tag}-finetuned", t0, two_four=method.kind == "2:4")
        return
    # channel pruning: whole filters removed, a smaller dense model
    if subject.module is None:
        raise UserError("channel pruning changes layer shapes and needs the PyTorch model; compare a registry "
                        "model or checkpoint, not an ONNX file")
    from ..passes.channel import prune_channels
    from .export import export_onnx

    t0 = time.perf_counter()
    example = torch.zeros(1, *spec.shape)
    pruned_module = prune_channels(subject.module.to(device), example.to(device), method.amount, subject.exclude)
    log(pruned_module.summary())
    small = export_onnx(pruned_module.module.cpu(), spec, subject.exclude)
    outs, engine = ev.outputs(small, f"{label} one-shot")
    info = {"flops_before": pruned_module.flops_before, "flops_after": pruned_module.flops_after,
            "params_before": pruned_module.params_before, "params_after": pruned_module.params_after,
            "channels": {k: list(v) for k, v in pruned_module.channels.items() if v[0] != v[1]}}
    add(_row(label, "one-shot", small, "dense", dense_weights, ev.score(outs),
             flops_ratio=pruned_module.flops_ratio, onnx_vs_torch=ev.torch_vs_onnx(pruned_module.module, engine),
             channel=info, file=saved(small, f"{tag}-oneshot"), seconds=time.perf_counter() - t0))
    del engine
    if not can_finetune:
        return
    t0 = time.perf_counter()
    model = pruned_module.module
    cfg = plan.config("channel")
    res = fit(model, train, val, spec, device, cfg, label=f"{label} fine-tune", progress=progress, log=log)
    _finetuned_row(label, "fine-tuned", model, [], subject, ev, "dense", dense_weights, res, cfg, add, saved,
                   f"{tag}-finetuned", t0, flops_ratio=pruned_module.flops_ratio)


def _finetuned_row(label, variant, model, mask_names, subject, ev, form, dense_weights, res, cfg, add, saved,
                   file_tag, t0, two_four=False, flops_ratio=None) -> None:
    from ..passes.graph import initializer_map
    from .export import export_onnx

    model = model.cpu().eval()
    exported = export_onnx(model, subject.spec, subject.exclude)
    check = check_masks_survive(model, exported, mask_names) if mask_names else {}
    if two_four and mask_names:
        inits = initializer_map(exported)
        check["two_four_layers"] = sum(
            1 for n in mask_names if n in inits and is_2to4(torch.from_numpy(onnx.numpy_helper.to_array(inits[n]).copy())))
    outs, engine = ev.outputs(exported, f"{label} {variant}")
    ft = {"epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "best_val_top1": res.best_val_top1,
          "stopped_early": res.stopped_early, "seconds": res.seconds, "config": cfg.to_dict(),
          "history": res.history}
    add(_row(label, variant, exported, form, dense_weights, ev.score(outs), flops_ratio=flops_ratio,
             onnx_vs_torch=ev.torch_vs_onnx(model, engine), finetune=ft, **check,
             file=saved(exported, file_tag), seconds=time.perf_counter() - t0))


# --- reporting ------------------------------------------------------------------------------

def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _one_line(row: dict) -> str:
    if row.get("error"):
        return f"{row['method']}: failed: {row['error']}"
    acc = row.get("top1", row.get("agree_top1", row.get("cell_agreement")))
    return (f"{row['method']} {row['variant']}: sparsity {row['sparsity']:.1%}, "
            f"{'top-1' if 'top1' in row else 'agreement'} {_fmt(acc, '.2f')}%, "
            f"ONNX {row['onnx_bytes'] / 1e6:.2f} MB, compressed {row['compressed_bytes'] / 1e6:.2f} MB")


COLUMNS = [  # header, key, format, width
    ("method", "method", "s", 22), ("variant", "variant", "s", 18), ("sparsity", "sparsity", ".1%", 8),
    ("FLOPs", "flops_ratio", ".0%", 6), ("top-1", "top1", ".2f", 6), ("top-5", "top5", ".2f", 6),
    ("agree", "agree_top1", ".2f", 6), ("cosine", "cosine", ".4f", 6), ("cells", "cell_agreement", ".2f", 6),
    ("MAD", "mean_abs_diff", ".4f", 6), ("ONNX MB", "onnx_mb", ".2f", 8), ("compr. MB", "compressed_mb", ".2f", 9),
    ("form", "compressed_form", "s", 5), ("masks", "masks_ok", "s", 5),
]


def _cells(row: dict) -> dict:
    out = dict(row)
    if "onnx_bytes" in row:
        out["onnx_mb"] = row["onnx_bytes"] / 1e6
        out["compressed_mb"] = row["compressed_bytes"] / 1e6
    out["masks_ok"] = None if "masks_survive" not in row else ("ok" if row["masks_survive"] else "LOST")
    return out


def _columns(results: list[dict]) -> list[tuple]:
    rows = [r for res in results for r in res["rows"]]
    return [c for c in COLUMNS if c[0] in ("method", "variant") or any(r.get(c[1]) is not None for r in map(_cells, rows))]


def _title(res: dict) -> str:
    return (f"{res['model']} on {res['data']} ({res['images']} images, input {res['input']['height']}x"
            f"{res['input']['width']}), evaluated through ONNX on the {res['runtime']} runtime ({res['device']})")


def _texts(row: dict, cols: list[tuple]) -> list[str]:
    return [_fmt(row.get(key), spec) if spec != "s" else str(row.get(key) if row.get(key) is not None else "-")
            for _, key, spec, _ in cols]


def format_table(results: list[dict]) -> str:
    """A plain-text table per model (one header line, one line per variant)."""
    lines = []
    for res in results:
        cols = _columns([res])
        lines.append(_title(res))
        lines.append("  ".join(f"{h:>{w}}" if i > 1 else f"{h:<{w}}" for i, (h, _, _, w) in enumerate(cols)))
        for row in map(_cells, res["rows"]):
            if row.get("error"):
                lines.append(f"{row['method']:<22}  failed: {row['error']}")
                continue
            lines.append("  ".join(f"{t:<{w}}" if i < 2 else f"{t:>{w}}"
                                   for i, (t, (_, _, _, w)) in enumerate(zip(_texts(row, cols), cols))))
        lines += [f"note: {note}" for note in res.get("notes", [])] + [""]
    lines.append("sparsity: weights zero or removed, over all Conv/Gemm weights; FLOPs: of the dense model (channel "
                 "pruning); compr.: CSR (nnz*8 + (rows+1)*4 bytes per layer) for unstructured, values + 2-bit "
                 "indices for 2:4, the smaller dense ONNX for channel; masks: zeros survive export + BN folding")
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    out = []
    for res in results:
        cols = _columns([res])
        out.append(f"**{_title(res)}**\n")
        out.append("| " + " | ".join(h for h, _, _, _ in cols) + " |")
        out.append("|" + "|".join("---" for _ in cols) + "|")
        for row in map(_cells, res["rows"]):
            if row.get("error"):
                out.append(f"| {row['method']} | failed: {row['error']} |" + " |" * (len(cols) - 2))
            else:
                out.append("| " + " | ".join(_texts(row, cols)) + " |")
        out += [f"\nNote: {note}" for note in res.get("notes", [])] + [""]
    return "\n".join(out)


def plot_results(results: list[dict], path: str | Path) -> Path:
    """Accuracy (or agreement) vs sparsity, one panel per model; hollow = one-shot, filled = fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.0 * len(results), 4.6), squeeze=False)
    colors = {"2:4": "tab:blue", "unstructured": "tab:orange", "channel": "tab:green"}
    for ax, res in zip(axes[0], results):
        rows = [r for r in res["rows"] if not r.get("error")]
        key, ylabel = (("top1", "top-1 accuracy (%)") if res.get("has_labels") else
                       ("agree_top1", "top-1 agreement with dense (%)") if res.get("output") == "classifier" else
                       ("cell_agreement", "coverage cells agreeing with dense (%)"))
        dense = next((r for r in rows if r["method"] == "dense"), None)
        if dense and dense.get(key) is not None:
            ax.axhline(dense[key], color="black", ls="--", lw=1, label=f"dense {dense[key]:.2f}%")
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            color = colors.get(method.split(" ")[0], "tab:gray")
            pts = {r["variant"]: r for r in rows if r["method"] == method and r.get(key) is not None}
            one = pts.get("one-shot")
            tuned = next((r for v, r in pts.items() if v != "one-shot"), None)
            if one:
                ax.scatter(100 * one["sparsity"], one[key], s=60, facecolors="none", edgecolors=color, lw=1.8,
                           label=f"{method}, one-shot")
            if tuned:
                ax.scatter(100 * tuned["sparsity"], tuned[key], s=60, color=color, label=f"{method}, {tuned['variant']}")
            if one and tuned:
                ax.annotate("", (100 * tuned["sparsity"], tuned[key]), (100 * one["sparsity"], one[key]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 1})
        ax.set_xlabel("sparsity: weights zero or removed (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{res['model']}: {res['data']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_json(obj, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def finetune_plan(arch: str | None, device: torch.device, *, epochs: int | None = None, lr: float | None = None,
                  batch_size: int | None = None, seed: int = 0, scope: str = "layer") -> FinetunePlan | None:
    """The model's fine-tuning recipe with the overrides; None for one-shot only (epochs 0).
    A CPU fine-tunes 1 epoch per method (or `epochs`) with batches of at most 64."""
    from .training import recipe_for

    if epochs == 0:
        return None
    if epochs is not None and epochs < 0:
        raise UserError(f"--finetune-epochs must be 0 or more, got {epochs}")
    base = recipe_for(arch or "").finetune
    if device.type == "cpu":
        base = dataclasses.replace(base, batch_size=min(base.batch_size, 64))
    base = dataclasses.replace(base, seed=seed, **{k: v for k, v in {"lr": lr, "batch_size": batch_size}.items() if v})
    plan = FinetunePlan(base, scope=scope)
    if epochs is not None or device.type == "cpu":
        n = epochs or 1
        plan.epochs = {k: n for k in plan.epochs}
    return plan


def finetune_data(data: str | None, test: ImageData, device: torch.device,
                  train_subset: int | None = None) -> tuple[ImageData | None, ImageData | None]:
    """(train, val) for fine-tuning, or (None, None) where there are none apart from the test images.
    A CPU uses the first 1000 training images unless `train_subset` says otherwise."""
    train_subset = train_subset if train_subset is not None else (1000 if device.type == "cpu" else None)
    try:
        train = load_data(data, "train").subset(train_subset)
        val = load_data(data, "val").subset(max(100, train_subset // 5) if train_subset else None)
    except UserError:
        return None, None
    if getattr(train, "root", None) is not None and train.root == getattr(test, "root", None):
        return None, None  # an ImageFolder without train/ and test/ sub-folders: never train on the test images
    return train, val
