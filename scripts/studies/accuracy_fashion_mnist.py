"""What does pruning cost in accuracy? ResNet-18 and VGG-19 on Fashion-MNIST, before and after pruning.

Run:  source scripts/gpu_env.sh && python3 scripts/studies/accuracy_fashion_mnist.py \
          --out results/accuracy-fashion-mnist/DATE-CARD [--ckpt-dir runs]
      (needs torch-pruning from .whl/ and the four Fashion-MNIST .gz files: the Debian folder,
      --data DIR, or .carry/fashion-mnist/ carried with the working tree)
      (CPU check of every code path: python3 scripts/studies/accuracy_fashion_mnist.py --dry-run --out /tmp/acc)

For each model, in one process: train dense (seeded, the `sparsecnn train` recipe), save the
checkpoint to --ckpt-dir (too big to bring back; `sparsecnn train MODEL` reproduces it), then
`compare`'s core on the full 10k test set: 2:4 one-shot and + fine-tune, 90% unstructured
one-shot and gradual (cubic) + fine-tune, channel pruning to half the FLOPs one-shot and +
fine-tune. Every variant is evaluated through its exported ONNX file on the torch runtime.
Epochs are planned from a short throughput probe so the whole run fits --budget-s.
Writes <out>/accuracy.json (every number, per-epoch histories), accuracy.png, accuracy.md; prints
a short table with the targets last.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from sparsecnn.converter.compare import (FinetunePlan, Method, Subject, compare_model, markdown_table,
                                         plot_results, write_json)
from sparsecnn.converter.training import recipe_for, save_checkpoint, train_model
from sparsecnn.converter.data import fashion_mnist_spec, load_data
from sparsecnn.converter.export import export_onnx
from sparsecnn.converter.finetune import FitConfig, make_optimizer
from sparsecnn.converter.study import environment, error_record, study_parser
from sparsecnn.models.registry import get_entry

MODELS = ("resnet18", "vgg19")
METHODS = [Method("2:4"), Method("unstructured", 0.9), Method("channel", 0.5)]
# Planned epochs at full budget; scaled down (not below FLOORS) when the probe says they do not fit.
EPOCHS = {"dense": 18, "2:4": 5, "unstructured": 12, "channel": 10}
FLOORS = {"dense": 8, "2:4": 2, "unstructured": 5, "channel": 3}
COST = {"dense": 1.0, "2:4": 1.0, "unstructured": 1.2, "channel": 0.6}  # per epoch, relative to dense training
# Seconds outside training per model (exports, prune passes, evaluations): VGG-19's 140M weights dominate.
OVERHEAD_S = {"resnet18": 30.0, "vgg19": 110.0}
# the libraries the accuracy depends on, reported beside it
STUDY_MODULES = ("torchvision", "torch_pruning", "onnx_graphsurgeon")
TARGETS = {"dense": 93.0, "2:4": 0.5, "unstructured": 1.5, "channel": 1.5}  # dense: top-1; others: max drop


def probe_seconds_per_epoch(arch: str, train, spec, device, cfg: FitConfig, steps: int) -> float:
    """Seconds per training epoch, from `steps` timed steps after a few warm-up ones."""
    from sparsecnn.converter.training import build_for_training
    from sparsecnn.converter.finetune import _autocast

    model = build_for_training(arch, recipe_for(arch), 10, 0).to(device).to(memory_format=torch.channels_last)
    opt, loss_fn = make_optimizer(model, cfg), torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = train.batches(spec, cfg.batch_size, device, shuffle=True, augment=True, generator=gen,
                            channels_last=True)
    model.train()

    def step():
        x, y = next(batches)
        with _autocast(device, cfg):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3 if device.type == "cuda" else 1):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    per_step = (time.perf_counter() - t0) / steps
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return per_step * -(-len(train) // cfg.batch_size)


def plan_epochs(available_s: float, sec_per_epoch: dict[str, float], phases: list[tuple[str, str]]) -> tuple[dict, float]:
    """Scale EPOCHS so the listed (model, phase) pairs fit `available_s`; returns ({(model, phase): epochs}, scale)."""
    need = sum(EPOCHS[p] * COST[p] * sec_per_epoch[m] for m, p in phases)
    scale = min(1.0, max(0.0, available_s) / need) if need > 0 else 1.0
    return {(m, p): max(FLOORS[p], round(EPOCHS[p] * scale)) for m, p in phases}, scale


def short_table(all_results: list[dict]) -> str:
    lines = [f"{'model':<9} {'method':<20} {'one-shot':>8} {'tuned':>7} {'drop':>6} {'target':>8} {'FLOPs':>6} "
             f"{'ONNX MB':>8} {'compr MB':>8}  verdict"]
    for res in all_results:
        rows = res.get("rows", [])
        dense = next((r for r in rows if r.get("method") == "dense"), None)
        if dense is None:
            lines.append(f"{res['model']:<9} failed: {res.get('error', 'no dense row')}")
            continue
        d = dense["top1"]
        ok = d >= TARGETS["dense"]
        lines.append(f"{res['model']:<9} {'dense':<20} {d:>8.2f} {'':>7} {'':>6} {'>=93.00':>8} {'100%':>6} "
                     f"{dense['onnx_bytes'] / 1e6:>8.1f} {dense['compressed_bytes'] / 1e6:>8.1f}  {'PASS' if ok else 'MISS'}")
        for m in METHODS:
            mr = [r for r in rows if r.get("method") == m.label]
            err = next((r["error"] for r in mr if r.get("error")), None)
            one = next((r for r in mr if r.get("variant") == "one-shot"), None)
            tuned = next((r for r in mr if r.get("variant") not in ("one-shot", "error")), None)
            if tuned is None:
                lines.append(f"{'':<9} {m.label:<20} {_f(one, 'top1'):>8} {'-':>7}   failed: {err or 'no fine-tuned row'}")
                continue
            drop = d - tuned["top1"]
            limit = TARGETS[m.kind]
            flops = tuned.get("flops_ratio")
            verdict = drop <= limit and (m.kind != "channel" or (flops is not None and flops <= 0.55))
            lines.append(f"{'':<9} {m.label:<20} {_f(one, 'top1'):>8} {tuned['top1']:>7.2f} {drop:>6.2f} "
                         f"{'<=' + format(limit, '.1f'):>8} {('-' if flops is None else format(flops, '.0%')):>6} "
                         f"{tuned['onnx_bytes'] / 1e6:>8.1f} {tuned['compressed_bytes'] / 1e6:>8.1f}  "
                         f"{'PASS' if verdict else 'MISS'}"
                         + ("" if tuned.get("masks_survive", True) else "  MASKS LOST IN EXPORT"))
    return "\n".join(lines)


def _f(row, key) -> str:
    return "-" if not row or row.get(key) is None else f"{row[key]:.2f}"


def main() -> None:
    ap = study_parser(__doc__, dry_run="CPU, tiny subsets, 1 epoch each: checks the code paths")
    ap.add_argument("--ckpt-dir", default="runs", help="where the trained dense checkpoints go (default runs/)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for the whole script")
    ap.add_argument("--data", help="Fashion-MNIST folder (default: the Debian package's files, or "
                                   "$SPARSECNN_FASHION_MNIST)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = {"env": environment(device, modules=STUDY_MODULES), "args": vars(args), "targets": TARGETS, "methods": [m.label for m in METHODS]}
    print(json.dumps(info["env"]), flush=True)

    if args.data is None:  # the GPU machine has no Debian package: the lead carries the files in .carry/
        carried = Path(__file__).resolve().parents[2] / ".carry" / "fashion-mnist"
        if not Path("/usr/share/datasets/fashion-mnist").is_dir() and carried.is_dir():
            args.data = str(carried)
    train, val, test = (load_data(args.data, s) for s in ("train", "val", "test"))
    if args.dry_run:
        train, val, test = train.subset(256), val.subset(64), test.subset(64)
    if device.type == "cuda":
        train, val, test = train.to(device), val.to(device), test.to(device)
    print(f"data: {len(train)} train, {len(val)} val, {len(test)} test images on {device}", flush=True)

    models = [m for m in args.models if get_entry(m)]
    specs = {m: fashion_mnist_spec(recipe_for(m).size) for m in models}
    sec_per_epoch = {}
    for m in models:
        try:
            probe_cfg = recipe_for(m).fit if not args.dry_run else dataclasses.replace(recipe_for(m).fit, batch_size=32)
            sec_per_epoch[m] = probe_seconds_per_epoch(m, train, specs[m], device, probe_cfg,
                                                       steps=12 if device.type == "cuda" else 1)
        except Exception as exc:  # no probe: assume a slow card rather than die
            traceback.print_exc()
            sec_per_epoch[m] = 6.0
        print(f"probe {m}: {sec_per_epoch[m]:.2f} s per epoch ({len(train)} images)", flush=True)
    info["probe_seconds_per_epoch"] = sec_per_epoch
    info["plans"] = []
    all_results: list[dict] = []

    def save_partial(results=None):
        payload = dict(info, results=all_results + ([results] if results is not None else []),
                       seconds=time.perf_counter() - t_start)
        write_json(payload, out / "accuracy.json")

    for i, arch in enumerate(models):
        spec = specs[arch]
        recipe = recipe_for(arch)
        remaining = models[i:]
        reserve = sum(OVERHEAD_S.get(m, 30.0) for m in remaining)
        available = args.budget_s - (time.perf_counter() - t_start) - reserve
        phases = [(m, p) for m in remaining for p in EPOCHS]
        epochs, scale = plan_epochs(available, sec_per_epoch, phases)
        if args.dry_run:
            epochs = {k: 1 for k in epochs}
        info["plans"].append({"model": arch, "available_s": available, "scale": scale,
                              "epochs": {p: epochs[(arch, p)] for p in EPOCHS}})
        print(f"plan {arch}: {available:.0f} s for training left, scale {scale:.2f}, epochs "
              + ", ".join(f"{p} {epochs[(arch, p)]}" for p in EPOCHS), flush=True)
        results = {"model": arch, "rows": []}
        try:
            cfg = dataclasses.replace(recipe.fit, epochs=epochs[(arch, "dense")])
            outcome = train_model(arch, device, train, val, test, spec, cfg, recipe, progress=False,
                                  log=lambda s: print(s, flush=True),
                                  command=f"sparsecnn train {arch} -o {arch}-fmnist.pt --epochs {cfg.epochs}")
            meta = outcome.checkpoint["train"]
            print(f"{arch} dense: test top-1 {meta['test_top1']:.2f}% ({meta['seconds']:.0f} s)", flush=True)
            ckpt_path = Path(args.ckpt_dir) / f"{arch}-fmnist.pt"
            try:
                save_checkpoint(outcome.checkpoint, ckpt_path)
                print(f"wrote {ckpt_path}", flush=True)
            except Exception as exc:
                print(f"could not save {ckpt_path}: {exc}", flush=True)
            train_meta = {k: v for k, v in meta.items() if k != "history"}
            train_meta["history"] = meta["history"]
            # re-plan the fine-tuning with what the dense training really took
            remaining_after = args.budget_s - (time.perf_counter() - t_start) - reserve
            ft_phases = [(arch, p) for p in ("2:4", "unstructured", "channel")] + \
                        [(m, p) for m in remaining[1:] for p in EPOCHS]
            ft_epochs, ft_scale = plan_epochs(remaining_after, sec_per_epoch, ft_phases)
            plan = FinetunePlan(dataclasses.replace(recipe.finetune, seed=0),
                                epochs={p: (1 if args.dry_run else ft_epochs[(arch, p)])
                                        for p in ("2:4", "unstructured", "channel")})
            info["plans"][-1]["finetune_epochs"] = plan.epochs
            info["plans"][-1]["finetune_scale"] = ft_scale
            print(f"fine-tune plan {arch}: {plan.epochs}", flush=True)
            module = outcome.model
            subject = Subject(arch, spec, get_entry(arch).exclude, module, export_onnx(module, spec, get_entry(arch).exclude),
                              arch)
            results = compare_model(subject, METHODS, test, device, train=train, val=val, plan=plan,
                                    batch_size=500, progress=False, log=lambda s: print(s, flush=True),
                                    on_row=save_partial)
            results["train"] = train_meta
            results["checkpoint"] = str(ckpt_path)
        except Exception as exc:  # one model failing must not lose the other's numbers
            traceback.print_exc()
            results.update(error_record(exc))
        all_results.append(results)
        save_partial()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    info["seconds"] = time.perf_counter() - t_start
    ok_results = [r for r in all_results if r.get("rows")]
    if ok_results:
        try:
            plot_results(ok_results, out / "accuracy.png")
        except Exception as exc:
            print(f"plot failed: {exc}", flush=True)
    table = short_table(all_results)
    md = [f"# Accuracy before and after pruning ({info['env'].get('card', 'cpu')})", "",
          "Fashion-MNIST, full test set (10000 images) unless --dry-run; every variant evaluated through its "
          "exported ONNX file (BatchNorm folded) on the torch runtime, fp32.", "",
          "```", table, "```", "", markdown_table(ok_results)]
    (out / "accuracy.md").write_text("\n".join(md))
    write_json(dict(info, results=all_results), out / "accuracy.json")
    print(f"\ntotal {info['seconds']:.0f} s; wrote {out}/accuracy.json, accuracy.png, accuracy.md\n")
    print(table)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
