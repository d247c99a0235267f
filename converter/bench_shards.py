"""`sparsecnn bench --devices`: the configurations split over several devices, one process each.

A configuration is one model x regime x batch: every engine of it (eager, the dense engines,
each runtime) is built and timed in one process on one device, so its speedups compare
timings of one card, as bench.run_networks does on one device. Each device gets a contiguous
run of configurations (a model's configurations stay together, so it is exported and pruned
once per device) and times them in its own process (`python -m sparsecnn.converter.bench_shards`):
never two timings on one GPU at once. The rows come back tagged with their device and card and
are merged in the one-device order.

One device is the same path with one shard, run in this process: with every configuration
assigned, it is exactly one run_networks call, as before.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..common.errors import UserError
from .bench import BenchConfig, run_networks
from .regimes import parse_regimes


def parse_devices(text: str) -> list[torch.device]:
    """'all' (every visible GPU), or comma-separated devices; a GPU may appear once."""
    from ..runtimes import resolve_device

    if text.strip() == "all":
        if not torch.cuda.is_available():
            raise UserError("--devices all: PyTorch sees no CUDA GPU here; give --devices cpu or leave it out")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = [resolve_device(t.strip()) for t in text.split(",") if t.strip()]
    if not devices:
        raise UserError(f"--devices needs devices such as cuda:0,cuda:1 or 'all', got '{text}'")
    devices = [torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d for d in devices]
    gpus = [d for d in devices if d.type == "cuda"]
    if len(set(gpus)) < len(gpus):
        raise UserError(f"--devices {text} names a GPU twice: two timings would share it and slow each other")
    if any(d.index >= torch.cuda.device_count() for d in gpus):
        raise UserError(f"--devices {text}: this machine shows {torch.cuda.device_count()} GPU(s)")
    return devices


def configurations(cfg: BenchConfig) -> list[tuple[str, str, int]]:
    """(model, regime, batch) in the order run_networks visits them."""
    return [(m, r.name, b) for m in cfg.models for r in cfg.regimes for b in cfg.batches]


def split(configs: list, parts: int) -> list[list]:
    """Contiguous runs of `configs`, as even as counts allow (some may be empty)."""
    n = len(configs)
    return [configs[i * n // parts:(i + 1) * n // parts] for i in range(parts)]


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def run_shard(cfg: BenchConfig, configs: list[tuple[str, str, int]], errors: list[dict]):
    """(network rows, layer entries, model info) for `configs` on cfg.device, each row tagged with it."""
    if configs == configurations(cfg):
        nets, layers, info = run_networks(cfg, errors)
    else:
        nets, layers, info, cache = [], [], {}, {}
        for model, regime, batch in configs:
            one = dataclasses.replace(cfg, models=[model], regimes=parse_regimes(regime), batches=[batch])
            n, l_, i = run_networks(one, errors, cache)
            nets += n
            layers += l_
            info.update(i)
    where = {"device": str(cfg.device), "card": card_name(cfg.device)}
    for row in nets + layers:
        row.update(where)
    return nets, layers, info


def run_sharded(cfg: BenchConfig, devices: list[torch.device], errors: list[dict], log=print):
    """run_networks' (rows, layers, info) over `devices`, plus one entry per shard (device, card, configs, s)."""
    configs = configurations(cfg)
    if len(devices) == 1:
        t0 = time.perf_counter()
        one = dataclasses.replace(cfg, device=devices[0])
        nets, layers, info = run_shard(one, configs, errors)
        return nets, layers, info, [_shard_entry(devices[0], configs, time.perf_counter() - t0)]
    parts = [(d, c) for d, c in zip(devices, split(configs, len(devices))) if c]
    results, shards = [], []
    with tempfile.TemporaryDirectory(prefix="sparsecnn-bench-") as tmp:
        running = []
        for i, (device, part) in enumerate(parts):
            spec, out = Path(tmp) / f"shard{i}.json", Path(tmp) / f"result{i}.json"
            spec.write_text(json.dumps({"config": {**cfg.to_dict(), "device": str(device), "progress": False},
                                        "configs": part, "threads": torch.get_num_threads()}))
            proc = subprocess.Popen([sys.executable, "-m", "sparsecnn.converter.bench_shards", str(spec), str(out)])
            running.append((device, part, out, proc, time.perf_counter()))
        for device, part, out, proc, t0 in running:
            code = proc.wait()
            seconds = time.perf_counter() - t0
            shards.append(_shard_entry(device, part, seconds))
            if code != 0 or not out.is_file():
                errors.append({"where": f"shard on {device}", "error": f"its process exited with status {code}; "
                               f"configurations not timed: {', '.join(f'{m} {r} b{b}' for m, r, b in part)}"})
                continue
            results.append(json.loads(out.read_text(encoding="utf-8")))
            log(f"bench: {device} ({card_name(device)}) timed {len(part)} configuration(s) in {seconds:.0f} s")
    nets, layers, info = [], [], {}
    for res in results:
        nets += res["networks"]
        layers += res["layers"]
        info.update(res["models"])
        errors += res["errors"]
    order = {c: i for i, c in enumerate(configs)}
    key = lambda r: order.get((r["model"], r["regime"], r["batch"]), len(order))  # noqa: E731 -- stable sort key
    return sorted(nets, key=key), sorted(layers, key=key), info, shards


def _shard_entry(device: torch.device, configs: list, seconds: float) -> dict:
    return {"device": str(device), "card": card_name(device), "seconds": seconds,
            "configurations": [{"model": m, "regime": r, "batch": b} for m, r, b in configs]}


def cards_line(shards: list[dict]) -> str:
    """Every card of the run, for the report's header: 'NVIDIA H100 (cuda:0), NVIDIA H100 (cuda:1)'."""
    return ", ".join(f"{s['card']} ({s['device']})" for s in shards)


def _worker(spec_path: str, out_path: str) -> int:
    """One shard's process: time its configurations on its device, write the rows as JSON."""
    from .bench_report import write_json

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    d = spec["config"]
    cfg = BenchConfig(**{**d, "regimes": parse_regimes(d["regimes"]), "device": torch.device(d["device"])})
    torch.set_num_threads(spec["threads"])
    if cfg.device.type == "cuda":
        torch.cuda.set_device(cfg.device)
    errors: list[dict] = []
    try:
        nets, layers, info = run_shard(cfg, [tuple(c) for c in spec["configs"]], errors)
    except UserError as exc:
        print(f"sparsecnn bench: error on {cfg.device}: {exc}", file=sys.stderr)
        return exc.exit_code
    write_json({"networks": nets, "layers": layers, "models": info, "errors": errors}, Path(out_path))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
