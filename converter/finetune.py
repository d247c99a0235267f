"""The training loop behind `sparsecnn train` and masked fine-tuning after pruning.

One loop serves both: dense training is fine-tuning without masks. With masks, pruned
weights stay exactly zero through every optimizer step: their gradients are zeroed before
the step (so weight decay and momentum get nothing from them), the masks are re-applied
after it, and the optimizer's per-weight state (SGD momentum, Adam's moments) is zeroed
at masked positions, so nothing can leak back when the masks are later relaxed or swapped.

Gradual pruning (Zhu & Gupta's cubic schedule, masks.cubic_sparsity) recomputes the masks
every few steps with the same rule the ONNX prune passes use (masks.module_masks).

On a GPU the whole data set sits in GPU memory and augmentation runs there (data.py);
steps run under bf16 autocast with channels-last activations, and the host reads the loss
back only a few times per epoch, so it never waits on the GPU in between.

Under torchrun (distributed.py) the same loop runs on every rank: the model in
DistributedDataParallel, each step's global batch (the one-process run's, same order and
augmentation) split over the ranks, masks computed on rank 0 and broadcast, re-applied
after every step on every rank; the schedules count global steps; evaluation is sharded
and its counts summed, so top-1 is over the whole set exactly once. BatchNorm statistics
are per rank (plain DDP), the one difference from the one-process run.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..common.errors import UserError
from ..models.registry import InputSpec
from ..passes.masks import conv_bn_pairs, cubic_sparsity, module_masks
from . import distributed
from .data import ImageData, global_batch_starts


@dataclass
class FitConfig:
    epochs: int = 10
    lr: float = 0.1                  # peak learning rate (after warm-up), cosine decay to 0
    batch_size: int = 256
    optimizer: str = "sgd"           # sgd (Nesterov momentum) | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = None   # max gradient norm (helps deep nets without BatchNorm)
    patience: int | None = None      # early stopping: epochs without a better validation top-1
    augment: bool = True             # random shifts of up to 2 px and horizontal flips
    seed: int = 0
    amp: bool = True                 # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True       # on CUDA
    batchnorm_scaffold: bool = False  # BN-free nets: train with a temporary BatchNorm after each conv

    def to_dict(self) -> dict:
        return asdict(self)


# Gradual pruning ramps over this share of the epochs; the rest fine-tunes at full sparsity.
GRADUAL_SHARE = 0.6


@dataclass
class GradualPruning:
    """Prune to `sparsity` over epochs [start_epoch, end_epoch) with the cubic schedule."""

    sparsity: float
    end_epoch: float
    start_epoch: float = 0.0
    initial: float = 0.0
    scope: str = "layer"
    exclude: tuple[str, ...] = ()
    every_steps: int = 0             # 0: about 8 mask updates per epoch


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_val_top1: float | None = None
    best_epoch: int | None = None
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Masker:
    """Holds keep-masks for named parameters and enforces them around optimizer steps."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None):
        self.params = dict(model.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}
        if masks:
            self.set_masks(masks)

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in masks if k not in self.params]
        if unknown:
            raise UserError(f"mask for '{unknown[0]}', which is not a parameter of the model")
        for k, m in masks.items():
            if m.shape != self.params[k].shape:
                raise UserError(f"mask for '{k}' has shape {tuple(m.shape)}, the weight {tuple(self.params[k].shape)}")
        # Float masks in the parameter's dtype and memory format: one fused multiply per list.
        self.masks = {k: m.to(self.params[k].device, self.params[k].dtype).contiguous(
            memory_format=_format_of(self.params[k])) for k, m in masks.items()}

    def _pairs(self, tensors: dict[str, torch.Tensor | None]):
        keys = [k for k in self.masks if tensors.get(k) is not None]
        return [tensors[k] for k in keys], [self.masks[k] for k in keys]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights."""
        ts, ms = self._pairs(self.params)
        if ts:
            torch._foreach_mul_(ts, ms)

    @torch.no_grad()
    def zero_grads(self) -> None:
        ts, ms = self._pairs({k: p.grad for k, p in self.params.items()})
        if ts:
            torch._foreach_mul_(ts, ms)

    @torch.no_grad()
    def zero_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight buffers (momentum, exp_avg, exp_avg_sq) at masked positions."""
        ts, ms = [], []
        for k, m in self.masks.items():
            state = optimizer.state.get(self.params[k], {})
            for buf in state.values():
                if isinstance(buf, torch.Tensor) and buf.shape == m.shape:
                    ts.append(buf)
                    ms.append(m.to(buf.dtype))
        if ts:
            torch._foreach_mul_(ts, ms)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.apply()
        self.zero_state(optimizer)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - float(sum(m.sum() for m in self.masks.values())) / total if total else 0.0


def fold_batchnorm(w: torch.Tensor, b: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """(weight, bias) of a conv/linear followed by `bn`, folded in float64: w * g / sqrt(v + eps),
    (b - m) * g / sqrt(v + eps) + beta. A per-output-channel scale, so zero weights stay zero."""
    w = w.detach().double()
    b = b.detach().double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return w * scale.view(-1, *([1] * (w.dim() - 1))), (b - bn.running_mean.double()) * scale + bn.bias.detach().double()


def fold_batchnorm_into(trained: nn.Module, target: nn.Module) -> None:
    """Copy `trained` (with Conv -> BatchNorm pairs) into `target` (the same net without them).

    Each BatchNorm is folded into its Conv (w * g / sqrt(v + eps), (b - m) * g / sqrt(v + eps) + beta);
    convolutions and linear layers are matched in order and must agree in shape.
    """
    pairs = conv_bn_pairs(trained)
    mods = dict(trained.named_modules())
    src = [(n, m) for n, m in trained.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    dst = [(n, m) for n, m in target.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(src) != len(dst):
        raise RuntimeError(f"cannot fold: {len(src)} weight layers trained, {len(dst)} in the target")
    with torch.no_grad():
        for (sn, s), (dn, d) in zip(src, dst):
            if s.weight.shape != d.weight.shape or d.bias is None:
                raise RuntimeError(f"cannot fold {sn} {tuple(s.weight.shape)} into {dn} {tuple(d.weight.shape)}")
            if sn in pairs:
                w, b = fold_batchnorm(s.weight, s.bias, mods[pairs[sn]])
            else:
                w, b = s.weight.detach(), s.bias.detach() if s.bias is not None else torch.zeros_like(d.bias)
            d.weight.copy_(w.to(d.weight.dtype))
            d.bias.copy_(b.to(d.bias.dtype))


class BatchNormScaffold:
    """A temporary BatchNorm after every Conv2d of a net that has none, for (re)training.

    A deep net without BatchNorm (VGG-19 with its BatchNorms folded) trains badly at the
    step sizes that pruning needs, and pruning 90% of its weights during fine-tuning
    collapsed it (Fashion-MNIST: 94% -> 66% mid-schedule). Each BatchNorm starts as the
    identity on a calibration batch (running mean/var = that batch's conv-output statistics,
    gamma = sqrt(var + eps), beta = mean), so the function is unchanged; it then trains as
    usual and `fold()` folds it back into its conv and removes it. The architecture and
    every parameter name are the original ones again afterwards, and the fold scales
    whole output channels, so pruned (zero) weights stay exactly zero.
    """

    ATTR = "scaffold_bn"

    def __init__(self, model: nn.Module, calib: torch.Tensor):
        self.model = model
        self.convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        self.handles = []
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(name):
            def hook(_mod, _inp, out):
                o = out.detach().float().transpose(0, 1).reshape(out.shape[1], -1)
                stats[name] = (o.mean(1), o.var(1, unbiased=False))
            return hook

        probes = [m.register_forward_hook(record(n)) for n, m in self.convs.items()]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(calib)
        finally:
            for h in probes:
                h.remove()
            model.train(was_training)
        for name, conv in self.convs.items():
            mean, var = stats[name]
            bn = nn.BatchNorm2d(conv.out_channels).to(device=conv.weight.device)
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.weight.copy_(torch.sqrt(var + bn.eps))
                bn.bias.copy_(mean)
            conv.add_module(self.ATTR, bn)
            self.handles.append(conv.register_forward_hook(lambda mod, _inp, out: getattr(mod, self.ATTR)(out)))

    @staticmethod
    def needed(model: nn.Module) -> bool:
        mods = list(model.modules())
        return any(isinstance(m, nn.Conv2d) for m in mods) and \
            not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods)

    def pairs(self) -> dict[str, str]:
        """{conv name: its BatchNorm's name}, the form masks.conv_bn_pairs gives (ranks folded magnitudes)."""
        return {n: f"{n}.{self.ATTR}" for n in self.convs}

    @torch.no_grad()
    def fold(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for conv in self.convs.values():
            bn = getattr(conv, self.ATTR)
            w, b = fold_batchnorm(conv.weight, conv.bias, bn)
            conv.weight.copy_(w.to(conv.weight.dtype))
            if conv.bias is None:
                conv.bias = nn.Parameter(b.to(conv.weight.dtype))
            else:
                conv.bias.copy_(b.to(conv.bias.dtype))
            delattr(conv, self.ATTR)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer '{cfg.optimizer}'; use sgd or adamw")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _autocast(device: torch.device, cfg: FitConfig):
    enabled = cfg.amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate_top1(model: nn.Module, data: ImageData, spec: InputSpec, device: torch.device, batch_size: int = 512,
                  cfg: FitConfig | None = None) -> float:
    """Top-1 accuracy (%) of `model` on labelled `data`, in eval mode; the model's mode is restored."""
    cfg = cfg or FitConfig()
    was_training = model.training
    model.eval()
    cl = cfg.channels_last and device.type == "cuda"
    correct = torch.zeros((), dtype=torch.long, device=device)
    with _autocast(device, cfg):  # each rank its own share; the counts are summed
        for x, y in data.shard(distributed.rank(), distributed.world_size()).batches(spec, batch_size, device,
                                                                                   channels_last=cl):
            correct += (model(x).argmax(1) == y).sum()
    distributed.all_reduce_sum(correct)
    model.train(was_training)
    return 100.0 * int(correct) / max(1, len(data))


def fit(model: nn.Module, train: ImageData, val: ImageData | None, spec: InputSpec, device: torch.device | str,
        cfg: FitConfig, masks: dict[str, torch.Tensor] | None = None, gradual: GradualPruning | None = None,
        label: str = "train", progress: bool = True, log: Callable[[str], None] = print) -> FitResult:
    """Train `model` in place on `train`; keep the weights with the best top-1 on `val`.

    `masks` (parameter name -> bool keep-mask) are enforced through every step. `gradual`
    prunes as it trains; the best checkpoint is then chosen among epochs at full sparsity.
    """
    device = torch.device(device)
    if cfg.epochs < 1:
        raise UserError(f"epochs must be at least 1, got {cfg.epochs}")
    if masks and gradual:
        raise UserError("give fixed masks or a gradual-pruning schedule, not both")
    shard = (distributed.rank(), distributed.world_size())
    world = shard[1]
    progress, log = progress and distributed.is_main(), distributed.main_only(log)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the same draws on every rank
    cl = cfg.channels_last and device.type == "cuda"
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    masker = Masker(model, distributed.broadcast_masks(masks)) if (masks or gradual) else None
    if masker and masks:
        masker.apply()
    scaffold = None
    if cfg.batchnorm_scaffold and BatchNormScaffold.needed(model):
        calib, _ = next(iter(train.batches(spec, cfg.batch_size, device, channels_last=cl)))
        scaffold = BatchNormScaffold(model, calib)
    net = distributed.wrap(model, device)  # after the scaffold, so DDP averages its BatchNorms' gradients too
    opt = make_optimizer(model, cfg)
    starts = global_batch_starts(len(train), cfg.batch_size, world)
    steps_per_epoch = len(starts)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    pairs = (scaffold.pairs() if scaffold else conv_bn_pairs(model)) if gradual else None
    if gradual:
        every = gradual.every_steps or max(1, steps_per_epoch // 8)
        g_start = int(gradual.start_epoch * steps_per_epoch)
        g_end = max(g_start, min(int(gradual.end_epoch * steps_per_epoch), total - 1))  # final sparsity is reached
    result = FitResult()
    best_state, best = None, -1.0
    since_best = 0
    t0 = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = _bar(steps_per_epoch, f"{label} {epoch + 1}/{cfg.epochs}", progress)
        batches = train.batches(spec, cfg.batch_size, device, shuffle=True, augment=cfg.augment, generator=gen,
                                channels_last=cl, shard=shard)
        for start, (x, y) in zip(starts, batches):
            if gradual and g_start <= step <= g_end and ((step - g_start) % every == 0 or step == g_end):
                s = gradual.sparsity if step >= g_end else cubic_sparsity(step - g_start, g_end - g_start,
                                                                          gradual.sparsity, gradual.initial)
                if distributed.is_main() or not masker.masks:
                    new, _ = module_masks(model, "unstructured", s, gradual.scope, gradual.exclude, pairs=pairs)
                else:  # rank 0 decides; the others receive into tensors of the right shapes
                    new = {k: torch.empty(m.shape, dtype=torch.bool, device=m.device) for k, m in masker.masks.items()}
                masker.set_masks(distributed.broadcast_masks(new))
                masker.after_step(opt)
            with _autocast(device, cfg):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            if world > 1:  # DDP averages over ranks; weighting by share makes it the global batch's mean
                (loss * (y.numel() * world / min(cfg.batch_size, len(train) - start))).backward()
            else:
                loss.backward()
            if masker:
                masker.zero_grads()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if masker:
                masker.after_step(opt)
            sched.step()
            loss_sum += loss.detach() * y.numel()
            seen += y.numel()
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if bar is not None:
            bar.close()
        totals = distributed.all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)]))
        loss_sum, seen = totals[0], int(totals[1])
        if not torch.isfinite(loss_sum):
            raise RuntimeError(f"{label}: the loss diverged (non-finite) in epoch {epoch + 1}; lower the learning rate")
        at_final = not gradual or step >= g_end
        row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, seen), "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        if masker:
            row["sparsity"] = masker.sparsity()
        if val is not None:
            row["val_top1"] = evaluate_top1(model, val, spec, device, cfg=cfg)
        result.history.append(row)
        result.epochs_run = epoch + 1
        log(f"{label} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}"
            + (f", val top-1 {row['val_top1']:.2f}%" if "val_top1" in row else "")
            + (f", sparsity {row['sparsity']:.3f}" if "sparsity" in row else "")
            + f", {row['seconds']:.0f} s")
        if val is not None and at_final:
            if row["val_top1"] > best:
                best, since_best = row["val_top1"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                result.best_val_top1, result.best_epoch = best, epoch + 1
            else:
                since_best += 1
                if cfg.patience is not None and since_best >= cfg.patience and epoch + 1 < cfg.epochs:
                    result.stopped_early = True
                    log(f"{label}: early stop, no better validation top-1 for {cfg.patience} epoch(s)")
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    if scaffold:
        scaffold.fold()
    if masker:
        masker.apply()
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def masks_from_weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """Keep-masks that freeze the current zeros of the named weights (e.g. after loading pruned weights)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() != 0 for n in names}


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
