"""The per-layer report: for every weight layer, what pruning did to it and what the runtime runs
for it, and why. One home for what `convert --engine`, `inspect` (a model, a runtime-rewritten
`--sparse-onnx` file or an engine file) and `bench` say per layer, and for its JSON.

Per layer:

- **pruning**: `pruned`, or `dense` with the rule that decided, as the prune passes apply it
  (`passes.prune.prunable_weights`): the model's exclusion list (stems and heads,
  `passes.graph.stem_and_head_roles`: registry models list theirs, a foreign ONNX file gets the
  structural rule), `--exclude` patterns, 2:4's input channels in fours (`passes.masks`).
  Depthwise convs are pruned like any layer (`prune_unstructured` counts them); their filters are
  tiny, so the report warns (`warnings`).
- **sparsity** and shape of the weight (of the hand-off model; a rewritten layer's from its op);
- **runtime**: the op the layer runs as after the runtime's rewrite, the kernel or library, the
  runtime's reason (the chooser's `Decision`: faster by X, dense measured faster, a candidate
  rejected for a wrong result or a failure; the runtime's own reason for a layer it keeps dense;
  the whole-graph guard), and the layer's time when one was measured.

An engine file keeps its report (`Engine.save` writes `report` beside `state`); an older file
without one is reported from its saved decisions (`state.choices`) and its model's custom ops.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx

REPORT_SCHEMA = "sparsecnn-layer-report"
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# sparsecnn-domain ops by the format they store (docs/ops.md)
OP_FORMATS = {"CsrConv": "csr", "CsrGemm": "csr", "CsrConvPool": "csr", "Conv2to4": "2:4", "Gemm2to4": "2:4",
              "EcrConv": "ecr", "EcrConvPool": "pecr"}


ROLE_RULES = {"stem": "stem (reads the input)", "head": "head (feeds an output)"}


def fit_name(name: str, width: int) -> str:
    """`name` in at most `width` characters: a long one keeps its distinguishing end behind a visible
    '…' (layer names share their beginnings; model paths their folders), so columns never run together."""
    name = str(name)
    return name if len(name) <= width else "…" + name[-(width - 1):]


# --- pruning: the rule per weight layer -------------------------------------------------------------

def prune_rules(model: onnx.ModelProto, exclude: list[str] | None = None, method: str | None = None
                ) -> dict[str, str]:
    """{weight: the rule that keeps it dense} for the weight layers a prune pass leaves alone (and for
    depthwise convs, which it prunes with a warning): the same rules `prunable_weights` and the passes
    apply, named. Stems read the input, heads reach an output with no weight layer between
    (`stem_and_head_roles`); a registry model lists its own, a foreign file gets that rule.
    `method`: '2:4' or 'unstructured' when known (2:4 also needs input channels in fours)."""
    from ..passes.graph import (PRUNE_EXCLUDE_KEY, dense_only_weight_nodes, initializer_map, prune_exclusions,
                                stem_and_head_roles, weight_nodes)
    from ..passes.masks import is_excluded
    from ..passes.prune import depthwise_weights

    listed = any(p.key == PRUNE_EXCLUDE_KEY for p in model.metadata_props)
    model_patterns = prune_exclusions(model)
    roles = stem_and_head_roles(model)
    depthwise = set(depthwise_weights(model))
    inits = initializer_map(model)
    rules: dict[str, str] = {}
    for node, weight, axis in weight_nodes(model):
        hit = next((p for p in exclude or [] if is_excluded(weight, [p], node.name)), None)
        if hit is not None:  # (the prune pass also adds it to the file's exclusion list)
            rules[weight] = f"--exclude {hit}"
            continue
        if is_excluded(weight, model_patterns):
            role = roles.get(weight)
            rules[weight] = ROLE_RULES.get(role, "the model's exclusion list")
            if role and not listed:
                rules[weight] += ", a foreign file's rule"
            continue
        dims = list(inits[weight].dims)
        if method == "2:4" and len(dims) > axis and dims[axis] % 4:
            rules[weight] = f"2:4 needs input channels in fours ({dims[axis]})"
            continue
        if weight in depthwise:
            rules[weight] = "depthwise conv (tiny filters)"
    for node, weight in dense_only_weight_nodes(model):
        rules[weight] = f"{node.op_type}: no runtime has a sparse kernel for it"
    return rules


def prune_rows(model: onnx.ModelProto, exclude: list[str] | None = None, method: str | None = None) -> list[dict]:
    """One row per standard weight layer of a (pruned) ONNX model: shape, sparsity, 2:4, pruning and rule."""
    from ..passes.inspect import layer_table

    rules = prune_rules(model, exclude, method)
    rows = []
    for info in layer_table(model):
        rule = rules.get(info.weight)
        depthwise = rule is not None and rule.startswith("depthwise")
        if rule is not None and not depthwise:
            pruning = "dense"
        elif info.sparsity > 0:
            pruning = "pruned"
        else:
            pruning = "prunable"
            rule = rule or "not pruned"
        row = {**info.to_dict(), "name": info.node, "pruning": pruning, "rule": rule or ""}
        row["shape"] = list(info.shape)
        if depthwise and info.sparsity > 0:
            # the name --exclude takes back: the module's where the weight has one, else the node's
            # (a file from torch.onnx.export names BatchNorm-folded weights 'onnx::Conv_12')
            name = info.weight.removesuffix(".weight") if "::" not in info.weight else info.node
            row["warning"] = (f"depthwise conv pruned to {info.sparsity:.0%}: its {int(np.prod(info.shape[1:]))}-weight "
                              f"filters lose most of their values; consider --exclude '{name}'")
        rows.append(row)
    return rows


# --- custom ops of a runtime-rewritten model ----------------------------------------------------------

def custom_op_rows(model: onnx.ModelProto) -> list[dict]:
    """One row per `sparsecnn`-domain node: the format it stores, its stored bytes and, where the op
    says it (CSR's non-zeros, a dense weight's zeros), the layer's shape and sparsity."""
    from ..passes.graph import SPARSECNN_DOMAIN, node_attrs, node_label, tensor_nbytes

    sizes = {t.name: t for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.domain != SPARSECNN_DOMAIN:
            continue
        attrs = node_attrs(node)
        stored = {i: sizes[i] for i in node.input if i in sizes}
        row = {"name": node_label(node), "op": f"sparsecnn::{node.op_type}",
               "format": OP_FORMATS.get(node.op_type, "sparse"),
               "stored_bytes": sum(tensor_nbytes(t) for t in stored.values()),
               "initializers": list(stored)}
        values = next((t for n, t in stored.items() if n.endswith(".csr.values")), None)
        row_ptr = next((t for n, t in stored.items() if n.endswith(".csr.row_ptr")), None)
        if values is not None and row_ptr is not None:
            m = int(row_ptr.dims[0]) - 1
            k = int(attrs.get("in_channels", 0)) * int(np.prod(attrs.get("kernel_shape", [1]))) or \
                int(attrs.get("in_features", 0))
            nnz = int(values.dims[0])
            row.update(nnz=nnz, shape=[m, k] if k else [m], params=m * k or None,
                       sparsity=1.0 - nnz / (m * k) if m * k else None)
        elif node.op_type.startswith("Ecr") and len(node.input) > 1 and node.input[1] in sizes:
            w = onnx.numpy_helper.to_array(sizes[node.input[1]])
            row.update(shape=list(w.shape), params=int(w.size), nnz=int(np.count_nonzero(w)),
                       sparsity=1.0 - np.count_nonzero(w) / max(1, w.size))
        elif node.op_type.endswith("2to4"):
            row["sparsity_note"] = "2 of every 4 stored (at least 50 % zeros)"
        rows.append(row)
    return rows


# --- what the runtime runs, and why -----------------------------------------------------------------

def is_weight_step(step: dict) -> bool:
    op = str(step.get("op", ""))
    return op in WEIGHT_OPS or op.startswith("sparsecnn::")


def runtime_reason(step: dict) -> str:
    """One line: why the runtime runs this layer the way it does (chooser decision, the runtime's own
    reason, the whole-graph guard), from an engine report row (`Engine.report()`)."""
    choice = step.get("choice") or {}
    parts = []
    if choice:
        chosen, reason = choice.get("chosen", ""), str(choice.get("reason", ""))
        vs = choice.get("vs_best_dense")
        sparse = not str(chosen).startswith("dense")
        if reason == "every candidate failed its check":
            parts.append("every sparse candidate rejected")
        elif sparse and vs:
            parts.append(f"faster: {vs:.2f}x the best dense form")
        elif "margin" in reason or "dense measured faster" in reason:
            parts.append(f"sparse slower ({reason})")
        elif reason:
            parts.append(reason)
        rejected = choice.get("rejected") or {}
        if rejected:
            kinds = sorted({("wrong result" if "wrong result" in why else "failed") for why in rejected.values()})
            parts.append(f"rejected {len(rejected)} ({', '.join(kinds)}: {next(iter(rejected))})")
        if choice.get("how") in ("saved", "forced"):
            parts.append({"saved": "replayed from the engine file", "forced": "forced by an option"}[choice["how"]])
        if choice.get("now") and choice.get("now") != chosen:
            parts.append(f"now {choice['now']}: {choice.get('why', 'switched')}")
    elif step.get("reason"):
        parts.append(str(step["reason"]))
    elif str(step.get("op", "")).startswith("sparsecnn::"):
        parts.append("rewritten to its sparse op (no measured choice)")
    if step.get("calibration"):  # an activation-sparse choice made on random input says so
        parts.append(str(step["calibration"]))
    if step.get("measured_on"):  # a reloaded choice measured on another card
        parts.append(str(step["measured_on"]))
    return "; ".join(parts)


def _step_fields(step: dict) -> dict:
    choice = step.get("choice") or {}
    kernel = step.get("kernel") or choice.get("chosen") or ""
    library = choice.get("library") or ""
    ms = None
    if isinstance(step.get("ms"), (int, float)):
        ms = float(step["ms"])
    elif choice.get("candidates_ms") and choice.get("chosen") in choice["candidates_ms"]:
        ms = float(choice["candidates_ms"][choice["chosen"]])
    out = {"runs_as": step.get("op", ""), "kernel": str(kernel), "library": library,
           "format": step.get("format") or ("dense" if str(step.get("op", "")) in WEIGHT_OPS else ""),
           "why": runtime_reason(step), "ms": ms}
    if choice:
        out["choice"] = choice
    for key in ("nnz", "sparsity"):
        if key in step:
            out[f"runtime_{key}"] = step[key]
    return out


def steps_from_choices(choices: dict) -> list[dict]:
    """Report rows for an engine file saved before engines kept their report: its saved decisions."""
    from ..runtimes.chooser import Decision

    rows = []
    for layer, d in (choices or {}).items():
        try:
            dec = Decision.from_dict(d)
        except TypeError:
            continue
        rows.append({"name": layer, "op": "", "kernel": d.get("active") or dec.chosen,
                     "format": "dense" if dec.dense else (dec.library or "sparse"), "choice": dec.report()})
    return rows


# --- roofline: what the card's peaks allow per layer ---------------------------------------------------

# the runtime's format of a layer -> the weight format the cost model prices
COST_FORMATS = {"dense": "dense", "csr": "csr", "sparsert": "csr", "2:4": "2:4", "cusparselt": "2:4"}
FEATURE_MAP_FORMATS = ("ecr", "pecr", "minkowski")


def card_roofline(device: str | None, card: dict | None, dtype: str | None, tf32: bool = False):
    """(Board with the card's peaks, precision, the report's `roofline` header) for an engine on `device`;
    (None, None, {'reason'}) when no roofline can be drawn there."""
    from ..common.peaks import card_peaks

    if device is None or str(device).startswith("cpu"):
        return None, None, {"reason": "a CPU engine: the roofline is drawn for GPUs only"}
    if not card:
        return None, None, {"reason": "the GPU is not named (an engine file saved before engines recorded their card)"}
    board, source = card_peaks(card.get("name", ""), tuple(card.get("capability") or ()) or None, card.get("sms"),
                               card.get("clock_khz"), card.get("mem_clock_khz"), card.get("bus_bits"))
    if board is None:
        return None, None, {"card": card.get("name"), "reason": source}
    precision = "fp16" if dtype == "fp16" else ("tf32" if tf32 else "fp32")
    peak = board.peak_tflops(precision)
    if not peak:
        return None, None, {"card": card.get("name"), "reason": f"no {precision.upper()} peak known for "
                                                                 f"{card.get('name')} ({source})"}
    what = {"fp32": "FP32 CUDA cores", "tf32": "TF32 tensor cores", "fp16": "FP16 tensor cores"}[precision]
    return board, precision, {"card": card.get("name"), "precision": precision, "peak": what, "peak_tflops": peak,
                              "bandwidth_gbs": board.dram_gbs, "source": source,
                              "label": "ESTIMATE from published peaks (not measured)"}


def add_roofline(rows: list[dict], costs: list[dict], board, precision: str) -> None:
    """Per weight layer that a runtime ran: its FLOPs and bytes at its sparsity in the runtime's format,
    max(FLOPs / peak, bytes / bandwidth) (`roofline_us`), the dense form's (`roofline_dense_us`), CSR's
    for a pruned layer (`roofline_csr_us`), and measured / roofline where the layer was timed; or
    `roofline_reason`."""
    from ..passes.roofline import format_cost, roofline_time
    from ..runtimes.csr.tensor_core import LABEL_PREFIX as TC_LABEL_PREFIX

    by_name = {c["name"]: c for c in costs if "m" in c}
    bpv = 2 if precision == "fp16" else 4
    for r in rows:
        if "runs_as" not in r:
            continue
        c = by_name.get(r["name"])
        fmt = COST_FORMATS.get(str(r.get("format") or "dense"))
        if fmt == "csr" and str((r.get("choice") or {}).get("chosen", "")).startswith(TC_LABEL_PREFIX):
            fmt = "tiled-csl"  # csr's tensor-core kernel: loads sparse, computes dense
        if c is None:
            r["roofline_reason"] = "shape unknown (shape inference does not reach the layer)"
            continue
        if fmt is None:
            r["roofline_reason"] = (f"feature-map-sparse format {r['format']}: its work depends on the input's zeros"
                                    if r.get("format") in FEATURE_MAP_FORMATS else f"no cost model for format "
                                                                                     f"{r.get('format')}")
            continue

        def time_us(f):
            cost = format_cost(c["m"], c["k"], c["n"], f, bpv, c["act_elems"], nnz=c["nnz"])
            t = roofline_time(cost["flops"], cost["bytes"], board, precision)
            return cost, t

        cost, t = time_us(fmt)
        dense_t = t if fmt == "dense" else time_us("dense")[1]
        r.update(roofline_format=fmt, roofline_flops=cost["flops"], roofline_bytes=cost["bytes"],
                 roofline_us=t["s"] * 1e6, roofline_bound=t["bound"], roofline_dense_us=dense_t["s"] * 1e6)
        if c["nnz"] < c["weights"]:
            r["roofline_csr_us"] = time_us("csr")[1]["s"] * 1e6
        if isinstance(r.get("ms"), (int, float)) and r["roofline_us"] > 0:
            r["measured_over_roofline"] = r["ms"] * 1e3 / r["roofline_us"]


def roof_line(roof: dict) -> str:
    """The report's one line saying what the roof column rests on (peaks, card, source) or why it is blank."""
    if roof.get("reason"):
        return f"roof: none ({roof['reason']})"
    batch = f", batch {roof['batch']}" if roof.get("batch") is not None else ""
    return (f"roof: {roof['label']}{batch}: max(FLOPs / {roof['peak_tflops']:g} TFLOP/s {roof['peak']}, bytes / "
            f"{roof['bandwidth_gbs']:g} GB/s) on {roof['card']} ({roof['source']}); then measured / roofline")


def roof_cell(r: dict) -> str:
    """The roofline column: the layer's roofline time and measured / roofline ('12.3us 2.4x'), or '–'."""
    if not isinstance(r.get("roofline_us"), (int, float)):
        return "–"
    ratio = r.get("measured_over_roofline")
    return f"{r['roofline_us']:.3g}us" + (f" {ratio:.1f}x" if ratio is not None else "")


# --- the report ---------------------------------------------------------------------------------------

def build_report(*, pruned: onnx.ModelProto | None = None, sparse: onnx.ModelProto | None = None,
                 steps: list[dict] | None = None, plans: dict | None = None, exclude: list[str] | None = None,
                 method: str | None = None, source: str = "", runtime: str | None = None,
                 device: str | None = None, dtype: str | None = None, base: list[dict] | None = None,
                 card: dict | None = None, tf32: bool = False, batch: int = 1, costs: list[dict] | None = None) -> dict:
    """The report as a JSON-ready dict. `pruned`: the hand-off model (pruning rules and sparsity), or
    `base`: its `prune_rows` computed already; `sparse`: the runtime-rewritten model (its custom ops);
    `steps`: the engine's report rows (`Engine.report()`, an engine file's, or `Engine.profile()`'s,
    which add each layer's time); `plans`: the engine's whole-graph plans. Where a runtime ran, each
    layer gets its roofline on `card` (`runtimes.base.card_properties`) at `batch` (the batch its time
    was measured at), from `costs` (`passes.roofline.layer_costs`; default: of `sparse`, else `pruned`)."""
    from_pruned = pruned is not None or base is not None
    base = list(base) if base is not None else (prune_rows(pruned, exclude, method) if pruned is not None else [])
    custom = custom_op_rows(sparse) if sparse is not None else []
    if not from_pruned and sparse is not None:
        base = prune_rows(sparse, exclude, method)  # the layers its rewrite left standard
        for c in custom:  # a rewritten layer: what its op says
            sp = c.get("sparsity")
            base.append({"name": c["name"], "op": c["op"], "weight": (c["initializers"] or [""])[0],
                         "shape": c.get("shape", []), "params": c.get("params"), "sparsity": sp,
                         "pruning": "pruned" if sp else ("dense" if sp == 0 else ""),
                         "rule": "" if sp != 0 else "dense weight (a feature-map-sparse op)"})
        order = {n.name: i for i, n in enumerate(sparse.graph.node)}
        base.sort(key=lambda r: order.get(r["name"], len(order)))
    rows = [dict(r) for r in base]
    by_name = {r["name"]: r for r in rows}
    for step in steps or []:
        if not is_weight_step(step):
            continue
        fields = _step_fields(step)
        row = by_name.get(step["name"])
        if row is None:  # a step the hand-off model does not name (a fused op, an older engine file)
            row = {"name": step["name"], "op": step.get("op", ""), "pruning": "", "rule": ""}
            rows.append(row)
            by_name[step["name"]] = row
        row.update(fields)
        if row.get("sparsity") is None and "runtime_sparsity" in fields:
            row["sparsity"] = fields["runtime_sparsity"]
        if not row["why"] and row.get("pruning") == "pruned" and row["runs_as"] in WEIGHT_OPS:
            row["why"] = ("the dense reference runtime" if runtime == "torch" else
                          "runs dense: the runtime's rewrite kept the standard op")
    warnings = [f"{r['name']}: {r['warning']}" for r in rows if r.get("warning")]
    pr = [r for r in rows if r.get("pruning") == "pruned"]
    summary = {"layers": len(rows), "pruned": len(pr), "dense": sum(1 for r in rows if r.get("pruning") == "dense"),
               "sparse_kernels": sum(1 for r in rows if _runs_sparse(r))}
    if from_pruned:
        summary.update(sparsity_summary_from_rows(rows))
    if custom:
        summary["custom_op_bytes"] = sum(c["stored_bytes"] for c in custom)
    report = {"schema": REPORT_SCHEMA, "version": 1, "source": source, "runtime": runtime, "device": device,
              "dtype": dtype, "layers": rows, "summary": summary, "warnings": warnings}
    if any("runs_as" in r for r in rows):
        board, precision, report["roofline"] = card_roofline(device, card, dtype, tf32)
        if board is not None:
            if costs is None:
                from ..passes.roofline import layer_costs

                model = sparse if sparse is not None else pruned
                costs = layer_costs(model, batch) if model is not None else []
            report["roofline"]["batch"] = batch
            add_roofline(rows, costs, board, precision)
    if custom:
        report["custom_ops"] = custom
    if plans:
        report["plans"] = plans
    return report


def _runs_sparse(row: dict) -> bool:
    """A layer the runtime runs with a sparse kernel (its report names a format other than dense)."""
    return "runs_as" in row and row.get("format") not in (None, "", "dense")


def sparsity_summary_from_rows(rows: list[dict]) -> dict:
    """Totals over the standard weight layers (as `passes.inspect.sparsity_summary` counts them)."""
    std = [r for r in rows if "nonzeros" in r]
    pr = [r for r in std if r.get("prunable")]
    total = sum(r["params"] for r in pr)
    return {"prunable_layers": len(pr), "prunable_params": total,
            "prunable_sparsity": 1.0 - sum(r["nonzeros"] for r in pr) / total if total else 0.0,
            "two_four_layers": sum(1 for r in pr if r.get("two_four")),
            "dense_bytes": sum(r["dense_bytes"] for r in std), "nonzero_bytes": sum(r["nonzero_bytes"] for r in std)}


def engine_file_report(path: str | Path) -> dict:
    """The report of a saved engine: its model (custom ops, pruning rules) and what it saved about its layers."""
    from ..runtimes.base import read_engine

    manifest, model, _ = read_engine(path)  # the one validator
    state = manifest.get("state") or {}
    steps = manifest.get("report")
    if steps is None:
        steps = steps_from_choices(state.get("choices"))
    opts = manifest.get("options") or {}
    report = build_report(sparse=model, steps=steps, plans=state.get("plans"), source=str(path),
                          runtime=manifest["runtime"], device=manifest.get("device"), dtype=opts.get("dtype"),
                          card=manifest.get("card"), tf32=bool(opts.get("tf32")))
    if manifest.get("report") is None:
        report["note"] = "an engine file from before engines kept their report: its saved decisions only"
    return report


def convert_report(pruned: onnx.ModelProto, args, *, sparse: onnx.ModelProto | None = None, engine=None,
                   device=None, source: str = "") -> dict:
    """`sparsecnn convert`'s report: the pruned model, with what the runtime rewrote and compiled when it did."""
    from ..passes.prune import parse_prune
    from ..runtimes.base import card_properties

    parsed = parse_prune(getattr(args, "prune", None))
    return build_report(pruned=pruned, sparse=sparse, steps=engine.report() if engine is not None else None,
                        card=card_properties(device) if engine is not None else None,
                        tf32=bool(getattr(args, "tf32", False)),  # the chooser timed each layer at batch 1
                        plans=getattr(engine, "plans", None), exclude=getattr(args, "exclude", None),
                        method=parsed[0] if parsed else None, source=source,
                        runtime=getattr(args, "runtime", None) if sparse is not None else None,
                        device=str(device) if device is not None else None,
                        dtype=getattr(args, "dtype", None) if engine is not None else None)


def emit(report: dict, *, table: bool, json_dest: str | None = None, stdout=None) -> None:
    """Print the report's table (`table`), its warnings (always, to stderr) and its JSON to `json_dest`
    (a file, or '-' for `stdout`: the stream the caller kept for it)."""
    if table:
        print(format_report(report), file=sys.stderr if json_dest == "-" else sys.stdout)
    else:
        for w in report.get("warnings") or []:
            print(f"warning: {w}", file=sys.stderr)
    if json_dest:
        written = write_json(report, json_dest, stdout=stdout)
        if written:
            print(f"wrote {written}")


# --- output -------------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def fit_text(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut at the end behind a visible '…' (kernel names, rules)."""
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def format_report(report: dict, name_width: int = 40) -> str:
    """The report as a text table (runtime columns only when a runtime ran), then its summary lines.
    Layer names keep their distinguishing end (cut from the left behind '…'), other cells their start."""
    rows = report["layers"]
    with_rt = any("runs_as" in r for r in rows)
    head = f"{'layer':<{name_width}} {'op':<12} {'shape':<16} {'sparsity':>8} {'2:4':>4}  {'pruning':<32}"
    if with_rt:
        head += f" {'runs as':<34} {'ms':>8} {'roof':>13}  why"
    lines = [head, "-" * len(head)]
    for r in rows:
        tf = r.get("two_four", "")
        tf = "n/a" if tf is None else ("yes" if tf is True else ("no" if tf is False else ""))
        pruning = r.get("pruning", "")
        if r.get("rule") and pruning != "pruned":
            pruning = f"{pruning}: {r['rule']}" if pruning else r["rule"]
        elif r.get("warning"):
            pruning = "pruned (see warning)"
        op = str(r.get("op", "")).replace("sparsecnn::", "")
        shape = "x".join(map(str, r.get("shape") or [])) or "–"
        line = (f"{fit_name(r['name'], name_width):<{name_width}} {fit_text(op, 12):<12} {fit_text(shape, 16):<16} "
                f"{_pct(r.get('sparsity')):>8} {tf:>4}  {fit_text(pruning, 32):<32}")
        if with_rt:
            runs = r.get("kernel") or str(r.get("runs_as", "")).replace("sparsecnn::", "")
            if r.get("library") and r["library"] not in runs:
                runs = f"{r['library']}: {runs}"
            ms = f"{r['ms']:.4f}" if isinstance(r.get("ms"), (int, float)) else "–"
            line += f" {fit_text(runs or '–', 34):<34} {ms:>8} {roof_cell(r):>13}  {r.get('why', '')}"
        lines.append(line.rstrip())
    lines.append("-" * len(head))
    s = report.get("summary", {})
    what = [f"{s.get('layers', len(rows))} weight layers", f"{s.get('pruned', 0)} pruned", f"{s.get('dense', 0)} kept dense"]
    if "prunable_sparsity" in s:
        what.append(f"sparsity over prunable layers {s['prunable_sparsity']:.4f}; 2:4 layers {s['two_four_layers']}; "
                    f"weights {s['dense_bytes'] / 2**20:.1f} MiB dense, {s['nonzero_bytes'] / 2**20:.1f} MiB non-zero")
    if with_rt:
        what.append(f"{s.get('sparse_kernels', 0)} on sparse kernels ({report.get('runtime')} on {report.get('device')}, "
                    f"{report.get('dtype')})")
    lines.append("; ".join(what))
    if report.get("roofline"):
        lines.append(roof_line(report["roofline"]))
    for shape, plan in (report.get("plans") or {}).items():
        ms = ", ".join(f"{k} {v:.3f} ms" for k, v in (plan.get("ms") or {}).items())
        lines.append(f"whole graph at {shape}: kept '{plan.get('chosen')}'"
                     + (f" ({ms})" if ms else "") + (f": {plan['reason']}" if plan.get("reason") else ""))
    custom = report.get("custom_ops") or []
    if custom:
        lines.append(f"custom ops ({len(custom)}, domain sparsecnn; {s.get('custom_op_bytes', 0) / 2**20:.2f} MiB "
                     "stored):")
        for c in custom:
            extra = f", {c['nnz']} non-zeros" if "nnz" in c else (f", {c['sparsity_note']}" if "sparsity_note" in c else "")
            lines.append(f"  {fit_name(c['name'], name_width):<{name_width}} {c['op']:<24} {c['format']:<5} "
                         f"{c['stored_bytes'] / 1024:.1f} KiB stored{extra}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    for w in report.get("warnings") or []:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def write_json(obj, dest: str | Path, stdout=None) -> str | None:
    """JSON to a file (atomically) or, for '-', to `stdout` (default sys.stdout); returns the file written
    (None for stdout). Every verb's `--json FILE|-` writes through here."""
    from ..common.fileio import write_text_atomic

    text = json.dumps(obj, indent=1, default=_jsonable)
    if str(dest) == "-":
        (stdout or sys.stdout).write(text + "\n")
        return None
    write_text_atomic(dest, text + "\n")
    return str(dest)


def _jsonable(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "tolist"):  # numpy and torch: arrays and scalars
        return o.tolist()
    return str(o)
