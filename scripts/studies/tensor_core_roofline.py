"""What can sparsity buy on tensor cores, by the roofline, per conv layer and per card or board?
An ESTIMATE from published peaks (passes/roofline.py: max(FLOPs / peak, bytes / bandwidth)), not a
measurement: it bounds what any kernel can reach and says which layers are compute- or memory-bound.

fp16, per conv layer a network prunes (stem and head stay dense, as everywhere), three forms:
  dense      the dense tensor-core rate, every weight read once;
  2:4        the 2:4 sparse tensor cores: half the FLOPs at the dense rate, half the weights + metadata;
  tiled-csl  unstructured at --sparsity, "load sparse, compute dense" (Flash-LLM; the csr runtime's
             tensor-core kernel): the dense FLOPs, one 32-bit word per non-zero.
The layers the tensor-core bars name are marked: VGG-19's convs with Cin and Cout >= 256 and every
512-channel 3x3 conv. Needs no GPU (shapes from ONNX shape inference, random weights):
    python3 scripts/studies/tensor_core_roofline.py --out results/tensor-core-roofline/DATE-estimate
Writes <out>/roofline.json and <out>/roofline.md; prints the per-card summary last.
"""
from __future__ import annotations

import json
from pathlib import Path

from sparsecnn.converter.export import export_onnx
from sparsecnn.converter.study import study_parser
from sparsecnn.models import load_model
from sparsecnn.passes.prune import prune_unstructured
from sparsecnn.common.peaks import BOARDS, CARDS
from sparsecnn.passes.roofline import CONV_OPS, format_cost, layer_costs, roofline_time

FORMS = ("dense", "2:4", "tiled-csl")


def targets() -> dict:
    """--cards names -> Board: the Jetson boards by key, the data-centre cards by torch's device name."""
    return {**BOARDS, **CARDS}


def named_layer(model: str, cost: dict) -> str:
    """Which tensor-core bar a layer falls under ('' for none)."""
    if cost["m"] == 512 and cost["k"] == 512 * 9:
        return "512-channel 3x3"
    if model == "vgg19" and cost["m"] >= 256 and cost["k"] >= 256 * 9:
        return "VGG-19 Cin, Cout >= 256"
    return ""


def layer_rows(model: str, costs: list[dict], board, sparsity: float) -> list[dict]:
    rows = []
    for c in costs:
        if c["op"] not in CONV_OPS or "m" not in c or c["nnz"] >= c["weights"]:  # a layer left dense by rule
            continue
        nnz = round((1.0 - sparsity) * c["m"] * c["k"])
        row = {"layer": c["name"], "m": c["m"], "k": c["k"], "n": c["n"], "bar": named_layer(model, c)}
        for form in FORMS:
            if form == "2:4" and not board.fp16_sparse_tflops:
                row[form] = None  # no sparse tensor cores
                continue
            cost = format_cost(c["m"], c["k"], c["n"], form, 2, c["act_elems"], nnz=nnz)
            t = roofline_time(cost["flops"], cost["bytes"], board, "fp16")
            row[form] = {"us": t["s"] * 1e6, "bound": t["bound"]} if t["s"] else None
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    def total(form):
        sel = [r for r in rows if r.get(form)]
        return sum(r[form]["us"] for r in sel) if sel else None

    out = {"layers": len(rows), "compute_bound_dense": sum(r["dense"]["bound"] == "compute" for r in rows)}
    for form in FORMS[1:]:
        d, s = total("dense"), total(form)
        out[f"{form}_speedup"] = d / s if d and s else None
        per = [r["dense"]["us"] / r[form]["us"] for r in rows if r.get(form)]
        out[f"{form}_layer_range"] = (min(per), max(per)) if per else None
    return out


def markdown(result: dict) -> str:
    out = ["# Tensor-core roofline: ESTIMATE from published peaks, not a measurement", "",
           f"fp16, unstructured at {result['sparsity']:.0%} for tiled-csl; per conv layer the network prunes; "
           "speedup = dense roofline / sparse roofline (sum over those layers).", ""]
    out += ["| card | model | batch | layers (compute-bound dense) | 2:4 whole | 2:4 per layer | "
            "tiled-csl whole | tiled-csl per layer |", "|---|---|---|---|---|---|---|---|"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    def rng(v):
        return "-" if v is None else f"{v[0]:.2f}-{v[1]:.2f}x"

    for e in result["estimates"]:
        s = e["summary"]
        out.append(f"| {e['card']} | {e['model']} | {e['batch']} | {s['layers']} ({s['compute_bound_dense']}) | "
                   f"{x(s['2:4_speedup'])} | {rng(s['2:4_layer_range'])} | {x(s['tiled-csl_speedup'])} | "
                   f"{rng(s['tiled-csl_layer_range'])} |")
    out += ["", "## The layers the tensor-core bars name", "",
            "| card | model | batch | layer | M x K x N | dense us (bound) | 2:4 | tiled-csl |", "|---|---|---|---|---|---|---|---|"]
    for e in result["estimates"]:
        for r in e["rows"]:
            if not r["bar"]:
                continue
            d = r["dense"]
            out.append(f"| {e['card']} | {e['model']} | {e['batch']} | {r['layer']} | {r['m']}x{r['k']}x{r['n']} | "
                       f"{d['us']:.1f} ({d['bound']}) | "
                       + " | ".join("-" if not r[f] else f"{d['us'] / r[f]['us']:.2f}x ({r[f]['bound']})"
                                    for f in FORMS[1:]) + " |")
    out += ["", "Peaks and their sources:", ""]
    out += [f"- {name}: {src}" for name, src in result["sources"].items()]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = study_parser(__doc__, writes="roofline.json and roofline.md")
    ap.add_argument("--models", default="resnet18,vgg19", help="registry models (default resnet18,vgg19)")
    ap.add_argument("--cards", default="orin-nano,orin-nano-super,NVIDIA H100 80GB HBM3",
                    help="Jetson board keys or card names of passes/roofline.py (default: Orin Nano, its Super "
                         "mode, the H100 SXM)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--sparsity", type=float, default=0.9, help="unstructured sparsity for tiled-csl (default 0.9)")
    args = ap.parse_args()
    known = targets()
    cards = [c.strip() for c in args.cards.split(",") if c.strip()]
    unknown = [c for c in cards if c not in known]
    if unknown:
        ap.error(f"unknown card(s) {', '.join(unknown)}; known: {', '.join(known)}")
    batches = [int(b) for b in args.batches.split(",")]
    result = {"label": "ESTIMATE from published peaks (not measured)", "sparsity": args.sparsity,
              "sources": {known[c].name: known[c].source for c in cards}, "estimates": []}
    for name in args.models.split(","):
        module, spec, entry = load_model(name)
        model = prune_unstructured(export_onnx(module, spec, entry.exclude, release=True), args.sparsity).model
        for batch in batches:
            costs = layer_costs(model, batch)
            for c in cards:
                rows = layer_rows(name, costs, known[c], args.sparsity)
                result["estimates"].append({"card": known[c].name, "model": name, "batch": batch, "rows": rows,
                                            "summary": summary(rows)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    text = markdown(result)
    (out / "roofline.md").write_text(text, encoding="utf-8")
    print(text.split("\n## ")[0])
    print(f"wrote {out / 'roofline.json'} and {out / 'roofline.md'}")


if __name__ == "__main__":
    main()
