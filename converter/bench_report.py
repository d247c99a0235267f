"""What `sparsecnn bench` writes: the JSON of every raw number, a Markdown report, PNG plots.

Plots (matplotlib, Agg):
- gemm_speedup.png -- speedup over cuBLAS vs weight sparsity per conv-GEMM shape (the seed
  poster's Figure 10), one panel per sparse method and precision regime;
- layers_<model>.png -- per-layer time of the best dense engine and every other engine's
  per-layer speedup over it (Figure 8; VGG-19 when benchmarked);
- summary.png -- Table-1 style: whole-network speedup over the best dense engine per model
  and engine, with model size and accuracy (when an accuracy file was given).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..common.errors import UserError
from ..common.fileio import read_json, write_text_atomic
from .figures import save_figure
from . import layer_report
from .layer_report import fit_name

MODE_SHORT = {"cudnn": "cuDNN", "cudnn_nhwc": "cuDNN NHWC", "im2col": "im2col", "im2col_nhwc": "im2col NHWC"}


def write_json(result: dict, path: Path) -> Path:
    layer_report.write_json(result, path)  # the one JSON writer (numpy/torch values, atomic)
    return path


def _f(v, fmt=".3f", none="–"):
    return none if v is None else format(v, fmt)


def _x(v, unreliable: bool = False):
    """A ratio; '?' after it when a measurement under it was noisy (bench.noisy)."""
    return "–" if v is None else f"{v:.2f}×" + ("?" if unreliable else "")


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


# --- the terminal: the short table and the outcome ---------------------------------------------

def short_table(result: dict) -> str:
    """Whole-network rows as a text table for the terminal; a ratio resting on a noisy measurement ends in '?'."""
    nets = [r for r in result.get("networks") or [] if r.get("median_ms")]
    if not nets:
        return ""
    lines = [f"{'model':<14}{'regime':<16}{'b':>3}  {'engine':<24}{'ms':>9}{'spread':>8}{'vs eager':>10}{'vs best':>10}"]

    def x(v, shaky):
        return (f"{v:8.2f}x" + ("?" if shaky else " ")) if v is not None else f"{'–':>10}"

    for r in nets:
        sp = f"{100 * r['spread']:.1f}%" if r.get("spread") is not None else "–"
        lines.append(f"{fit_name(r['model'], 13):<14}{r['regime']:<16}{r['batch']:>3}  {fit_name(r['engine'], 23):<24}"
                     f"{r['median_ms']:>9.3f}{sp:>8}{x(r.get('speedup_vs_eager'), r.get('unreliable_vs_eager'))}"
                     f"{x(r.get('speedup_vs_best_dense'), r.get('unreliable_vs_best_dense'))}")
    if any(r.get("unreliable_vs_eager") or r.get("unreliable_vs_best_dense") for r in nets):
        lines.append("? = a noisy measurement: the ratio is not reliable (see the warning)")
    return "\n".join(lines)


def outcome_lines(result: dict, md: Path) -> tuple[list[str], bool]:
    """The lines that end a run on stderr -- noisy ratios, parts skipped, parts failed (one line each) --
    and whether any part failed (the command then exits 1)."""
    from .bench import P90_MIN_LIMIT, SPREAD_LIMIT, failed_parts, skipped_parts

    lines = []
    nets = [r for r in result.get("networks") or [] if r.get("speedup_vs_best_dense") is not None]
    shaky = [r for r in nets if r.get("unreliable_vs_best_dense") or r.get("unreliable_vs_eager")]
    gemm = [r for r in (result.get("gemm") or {}).get("rows") or [] if r.get("speedup_vs_cublas") is not None]
    shaky_gemm = [r for r in gemm if r.get("unreliable")]
    if shaky or shaky_gemm:
        cpu = "; on a CPU timings are noisy by nature" if str(result.get("env", {}).get("device", "")).startswith("cpu") \
            else ""
        lines.append(f"warning: {len(shaky)} of {len(nets)} network speedups and {len(shaky_gemm)} of {len(gemm)} GEMM "
                     f"speedups rest on noisy measurements (runs differing by over {SPREAD_LIMIT:.0%} or p90/min over "
                     f"{P90_MIN_LIMIT:g}), marked '?'{cpu}; raise --budget-ms or --repeats, or use a quiet GPU")
    skipped, failed = skipped_parts(result), failed_parts(result)
    if skipped:
        lines.append(f"bench: {len(skipped)} part(s) not supported here were skipped ({_parts(skipped, group=True)}); "
                     f"see 'Skipped' in {md}")
    if failed:
        lines.append(f"bench: error: {len(failed)} part(s) failed ({_parts(failed)}); see 'Errors' in {md}")
    return lines, bool(failed)


def _parts(items: list[dict], show: int = 3, group: bool = False) -> str:
    """A few parts as 'where: first line of why' (or, `group`ed, each reason once with its count) and how
    many more: the summary stays one line."""
    def why(e):
        text = str(e.get("error", "")).strip().splitlines()
        return (text[0] if text else "")[:90].rstrip(" ;,")

    if group:
        counts: dict[str, int] = {}
        for e in items:
            counts[why(e)] = counts.get(why(e), 0) + 1
        shown = [f"{n}x {reason}" for reason, n in list(counts.items())[:show]]
        rest = len(counts) - show
    else:
        shown = [f"{e['where']}: {why(e)}" for e in items[:show]]
        rest = len(items) - show
    return "; ".join(shown) + (f"; and {rest} more" if rest > 0 else "")


# --- Markdown --------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    env, st = result.get("env", {}), result.get("settings", {})
    lines = [f"# sparsecnn bench on {env.get('card', '?')}", ""]
    lines.append(f"Card **{env.get('card')}** ({env.get('capability', '')}), driver {env.get('driver')}, "
                 f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
                 f"Python {env.get('python')}; {env.get('time')}.")
    if st:
        lines.append(f"Regimes {', '.join(st.get('regimes', []))}; batch {', '.join(map(str, st.get('batches', [])))}; "
                     f"L2 flushed before each run: {'yes' if st.get('flush_l2') else 'no'}; each configuration "
                     f"timed {st.get('repeats')} times (spread = |run1 - run2| / min); "
                     + ("times are medians of CUDA-graph replays (eager: of eager calls)."
                        if str(st.get("device", "")).startswith("cuda") else
                        "on CPU, times are medians of eager calls and say little (no GPU)."))
    lines += ["", "Speedups are against eager PyTorch and against the *best dense* time: the fastest dense "
              "engine measured in the same run (claims are made against the latter).", ""]
    nets = result.get("networks") or []
    if nets:
        lines += ["## Whole network", "",
                  "| model | prune | engine | regime | batch | median ms | p90 ms | spread | vs eager | vs best dense | rel. err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in nets:
            lines.append(f"| {r['model']} | {r.get('prune') or '–'} | {r['engine']} | {r['regime']} | {r['batch']} | "
                         f"{_f(r.get('median_ms'))} | {_f(r.get('p90_ms'))} | {_pct(r.get('spread'))} | "
                         f"{_x(r.get('speedup_vs_eager'), r.get('unreliable_vs_eager'))} | "
                         f"{_x(r.get('speedup_vs_best_dense'), r.get('unreliable_vs_best_dense'))} | "
                         f"{_f(r.get('rel_err'), '.1e')} |")
        spreads = [r["spread"] for r in nets if r.get("spread") is not None and r["kind"] != "eager"]
        if spreads:
            lines += ["", f"Largest run-to-run spread of a graph-replayed network: {_pct(max(spreads))} "
                          f"(median {_pct(sorted(spreads)[len(spreads) // 2])})."]
        shaky = [r for r in nets if r.get("unreliable_vs_best_dense") or r.get("unreliable_vs_eager")]
        if shaky:
            lines += ["", f"**{len(shaky)} of {len(nets)} rows have a ratio marked ?**: one of its two measurements "
                          "is noisy (its runs differ by over 10 %, or its p90 is over 1.5× its fastest sample), "
                          "so the ratio is not reliable."]
        plans = [r for r in nets if r.get("plans") and r["kind"] == "dense"]
        if plans:
            lines += ["", "### Best dense engine: what it chose", "",
                      "| model | regime | batch | whole-network plans (ms) | kept | convs per engine |", "|---|---|---|---|---|---|"]
            counts = _choice_counts(result)
            for r in plans:
                for shape, p in r["plans"].items():
                    ms = ", ".join(f"{k} {v:.3f}" for k, v in (p.get("ms") or {}).items())
                    c = counts.get((r["model"], r["regime"], r["batch"]), {})
                    lines.append(f"| {r['model']} | {r['regime']} | {r['batch']} | {ms} | {p['chosen']} | "
                                 f"{', '.join(f'{MODE_SHORT.get(k, k)} {v}' for k, v in sorted(c.items())) or '–'} |")
        guarded = [r for r in nets if r["kind"] == "runtime" and r.get("guard") not in (None, "off")]
        if guarded:
            lines += ["", "### Whole-graph guard: the engine people deploy vs the library as it is", "",
                      "Every sparse engine is timed against its own all-dense and uniform cuDNN plans (interleaved); "
                      "where it loses it reverts layers to dense (`partial`) or falls back whole, and the row "
                      "`… as is` keeps the library's own graph (guard off).", "",
                      "| model | engine | regime | batch | kept | plans (ms) | why |", "|---|---|---|---|---|---|---|"]
            for r in guarded:
                for shape, p in (r.get("plans") or {}).items():
                    ms = ", ".join(f"{k} {v:.3f}" for k, v in (p.get("ms") or {}).items()) or "–"
                    lines.append(f"| {r['model']} | {r['engine']} | {r['regime']} | {r['batch']} | {p.get('chosen')} | "
                                 f"{ms} | {p.get('reason', '')} |")
    layers = result.get("layers") or []
    if layers:
        lines += ["", "## Why (no) speedup: the share of time a runtime can accelerate", "",
                  "The share of the best dense engine's per-layer time spent in layers the runtime runs with its "
                  "own kernels; Amdahl bound = the whole-network speedup if those layers took no time at all; "
                  "predicted = what the runtime's per-layer times add up to; measured = whole-network graph replays.",
                  "",
                  "| model | engine | regime | batch | accelerated layers | their speedup | share of dense time | "
                  "Amdahl bound | predicted from layers | measured |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in layers:
            if e["kind"] == "dense":
                continue
            b = e["bound"]
            lines.append(f"| {e['model']} | {e['engine']} | {e['regime']} | {e['batch']} | {b['accelerated_layers']} | "
                         f"{_x(b.get('accelerated_speedup'))} | {_pct(b['share'])} | {_x(b['amdahl_max_speedup'])} | {_x(b['predicted_speedup'])} | "
                         f"{_x(b.get('measured_speedup'))} |")
        lines += ["", "## Per layer (weight layers; dense = the best dense engine's same layer)", "",
                  "Pruning: pruned, or the rule that kept the layer dense; runs as / why: what the runtime chose "
                  "for the layer and its reason (the layer report, as `sparsecnn inspect ENGINE` shows it).", ""]
        for e in layers:
            if e["engine"] == e["reference"]:
                continue
            report = {r["name"]: r for r in (e.get("report") or {}).get("layers", [])}
            roof = (e.get("report") or {}).get("roofline") or {}
            lines += [f"### {e['model']} · {e['engine']} · {e['regime']} · batch {e['batch']}", ""]
            if roof:  # roof: the layer's roofline time on this card and measured / roofline
                lines += [layer_report.roof_line(roof), ""]
            lines += ["| layer | op | pruning | sparsity | dense ms | ms | speedup | roof | runs as | why |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in e["rows"]:
                if r["op"] in ("Conv", "Gemm", "MatMul") or r["op"].startswith("sparsecnn::"):
                    rep = report.get(r["name"], {})
                    pruning = rep.get("pruning", "")
                    if rep.get("rule") and pruning != "pruned":
                        pruning = f"{pruning}: {rep['rule']}"
                    lines.append(f"| {r['name']} | {r['op']} | {pruning} | {_f(rep.get('sparsity'), '.3f', '')} | "
                                 f"{_f(r.get('dense_ms'), '.4f')} | {_f(r['ms'], '.4f')} | {_x(r.get('speedup'))} | "
                                 f"{layer_report.roof_cell(rep)} | {rep.get('kernel', r.get('kernel', ''))} | "
                                 f"{rep.get('why', '')} |")
            if (gap := roof_gap(list(report.values()))):
                lines.append(f"\n{gap}")
            for w in (e.get("report") or {}).get("warnings", []):
                lines.append(f"\nwarning: {w}")
            lines.append("")
        best = [e for e in layers if e["engine"] == e["reference"]]
        if best:
            lines += ["## Best dense engine per layer (measured candidates, ms)", ""]
            for e in best:
                lines += [f"### {e['model']} · {e['regime']} · batch {e['batch']}", "",
                          "| layer | chosen | cuDNN | cuDNN NHWC | im2col | im2col NHWC | layer ms |", "|---|---|---|---|---|---|---|"]
                for r in e["rows"]:
                    for shape, ch in (r.get("choices") or {}).items():
                        ms = ch.get("ms", {})
                        lines.append(f"| {r['name']} | {MODE_SHORT.get(ch.get('chosen'), ch.get('chosen'))} | "
                                     + " | ".join(_f(ms.get(m), '.4f') for m in MODE_SHORT) + f" | {_f(r['ms'], '.4f')} |")
                lines.append("")
    gemm = result.get("gemm")
    if gemm and gemm.get("rows"):
        lines += _gemm_markdown(gemm)
    summ = result.get("summary") or []
    if summ:
        lines += ["", "## Summary (Table 1 style)", "",
                  "| model | prune | engine | regime | batch | size MB | non-zero MB | ms | vs best dense | vs eager | top-1 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in summ:
            lines.append(f"| {r['model']} | {r['prune']} | {r['engine']} | {r['regime']} | {r['batch']} | "
                         f"{_f(r.get('model_mb'), '.1f')} | {_f(r.get('nonzero_mb'), '.1f')} | {_f(r['median_ms'])} | "
                         f"{_x(r.get('speedup_vs_best_dense'))} | {_x(r.get('speedup_vs_eager'))} | "
                         f"{_pct(r.get('top1'))} |")
    from .bench import failed_parts, skipped_parts

    failed, skipped = failed_parts(result), skipped_parts(result)
    if failed:
        lines += ["", "## Errors (the rest of the run went on)", ""]
        lines += [f"- {e['where']}: {e['error']}" for e in failed]
    if skipped:
        lines += ["", "## Skipped (not supported by the runtime or on this device)", ""]
        lines += [f"- {e['where']}: {e['error']}" for e in skipped]
    if result.get("files"):
        lines += ["", "Files: " + ", ".join(f"`{f}`" for f in result["files"])]
    return "\n".join(lines) + "\n"


def _choice_counts(result: dict) -> dict:
    out: dict = {}
    for e in result.get("layers") or []:
        if e["engine"] != e["reference"]:
            continue
        c = out.setdefault((e["model"], e["regime"], e["batch"]), {})
        for r in e["rows"]:
            for ch in (r.get("choices") or {}).values():
                c[ch["chosen"]] = c.get(ch["chosen"], 0) + 1
    return out


def _gemm_markdown(gemm: dict) -> list[str]:
    rows = gemm["rows"]
    lines = ["", "## GEMM sweep (conv layers as GEMMs, batch 1)", "",
             "C[M,N] = W[M,K] @ B[K,N]; time in µs (median of CUDA-graph replays), speedup over cuBLAS in the "
             "same regime; every result checked against the fp64 product.", "",
             "| M | K | N | sparsity | method | regime | µs | spread | vs cuBLAS | rel. err | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("dense_method") and r.get("timed_at_sparsity") is not None:
            continue  # the dense number is the same at every sparsity; listed once
        us = r.get("median_ms")
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['sparsity']:g} | {r['method']} | {r['regime']} | "
                     f"{_f(us * 1e3 if us else None, '.1f')} | {_pct(r.get('spread'))} | "
                     f"{_x(r.get('speedup_vs_cublas'), r.get('unreliable'))} | "
                     f"{_f(r.get('rel_err'), '.1e')} | {'yes' if r.get('ok') else ('ERROR' if r.get('error') else 'NO')} |")
    bad = [r for r in rows if r.get("ok") is False]
    if bad:
        lines += ["", f"{len(bad)} result(s) outside tolerance: " + "; ".join(
            f"{r['method']} {r['regime']} {r['M']}x{r['K']}x{r['N']} s={r['sparsity']:g} err {r['rel_err']:.1e}" for r in bad[:10])]
    return lines


# --- plots -----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


ROOF_FACTOR = 3.0  # a kernel within this factor of its layer's roofline time is near the card's limit


def roof_gap(rows: list[dict]) -> str:
    """One line: how many timed weight layers run within ROOF_FACTOR of their roofline time, and the
    furthest ones (the layers where a kernel, not the card, is the limit); '' when nothing was priced."""
    ratios = sorted(((r["measured_over_roofline"], r["name"]) for r in rows
                     if isinstance(r.get("measured_over_roofline"), (int, float))), reverse=True)
    if not ratios:
        return ""
    near = sum(1 for v, _ in ratios if v <= ROOF_FACTOR)
    far = ", ".join(f"{name} {v:.1f}x" for v, name in ratios[:3] if v > ROOF_FACTOR)
    return (f"roof gap: {near} of {len(ratios)} timed layers within {ROOF_FACTOR:g}x of their roofline time "
            f"(median {statistics.median(v for v, _ in ratios):.1f}x)" + (f"; furthest: {far}" if far else ""))


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def plot_gemm_speedup(gemm: dict, card: str = ""):
    """Figure 10: speedup over cuBLAS (same regime) vs sparsity, a line per shape, geomean bold."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in gemm["rows"] if not r.get("dense_method") and r.get("speedup_vs_cublas")]
    # geomean over shapes of cuBLAS fp32-cuda-core time / cuBLAS time in another regime
    base = {(r["M"], r["K"], r["N"]): r["median_ms"] for r in gemm["rows"]
            if r["method"] == "cublas" and r["regime"] == "fp32-cuda-core" and r.get("median_ms")}
    dense_vs = {}
    for other in ("fp32", "fp16"):
        ratios = [base[(r["M"], r["K"], r["N"])] / r["median_ms"] for r in gemm["rows"]
                  if r["method"] == "cublas" and r["regime"] == other and r.get("median_ms")
                  and (r["M"], r["K"], r["N"]) in base and r.get("timed_at_sparsity") is None]
        if ratios:
            dense_vs[other] = _geomean(ratios)
    panels = sorted({(r["method"], r["regime"]) for r in rows})
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.9 * nrow), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (method, regime) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["method"], r["regime"]) == (method, regime)]
        shapes = sorted({(r["M"], r["K"], r["N"]) for r in sel})
        for i, shp in enumerate(shapes):
            pts = sorted((r["sparsity"], r["speedup_vs_cublas"]) for r in sel if (r["M"], r["K"], r["N"]) == shp)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1,
                    color=cmap(i / max(1, len(shapes) - 1)), label=f"{shp[0]}×{shp[1]}×{shp[2]}")
        sps = sorted({r["sparsity"] for r in sel})
        gm = [_geomean([r["speedup_vs_cublas"] for r in sel if r["sparsity"] == s]) for s in sps]
        ax.plot(sps, gm, color="black", lw=2.5, label="geomean")
        ax.axhline(1.0, color="red", ls="--", lw=1, label="cuBLAS")
        for other, style in (("fp32", ":"), ("fp16", "-.")):  # what tensor cores give a dense GEMM, for scale
            if regime == "fp32-cuda-core" and other in dense_vs:
                ax.axhline(dense_vs[other], color="gray", ls=style, lw=1.2,
                           label=f"cuBLAS {'TF32' if other == 'fp32' else other} (geomean)")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("weight sparsity (fraction of zeros)")
        ax.set_ylabel(f"speedup over cuBLAS {regime} (×)")
        ax.set_title(f"{method}, {regime}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, title="M×K×N", title_fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    fig.suptitle(f"Sparse GEMM vs cuBLAS, conv-layer shapes at batch 1{' — ' + card if card else ''}")
    fig.tight_layout()
    return fig


def _pick_layers(result: dict, model: str | None):
    entries = result.get("layers") or []
    if not entries:
        return None, []
    models = [e["model"] for e in entries]
    model = model if model in models else ("vgg19" if "vgg19" in models else models[0])
    regimes = result.get("settings", {}).get("regimes") or [entries[0]["regime"]]
    regime = "fp32-cuda-core" if any(e["regime"] == "fp32-cuda-core" and e["model"] == model for e in entries) \
        else next(r for r in regimes if any(e["regime"] == r and e["model"] == model for e in entries))
    batch = min(e["batch"] for e in entries if e["model"] == model and e["regime"] == regime)
    sel = [e for e in entries if (e["model"], e["regime"], e["batch"]) == (model, regime, batch)]
    return (model, regime, batch), sel


# the winning library of a layer, in engines that choose per layer among libraries (hybrid)
LIBRARY_COLOURS = {"dense": "#8c8c8c", "torch": "#8c8c8c", "csr": "#4c72b0", "ecr": "#55a868", "pecr": "#2e7d32",
                   "cusparselt": "#c44e52", "sparsert": "#8172b2"}


def plot_layers(result: dict, model: str | None = None):
    """Figure 8: per weight layer, the best dense engine's time and each engine's speedup over it."""
    plt = _plt()
    key, sel = _pick_layers(result, model)
    if not sel:
        return None
    model, regime, batch = key
    ref = next((e for e in sel if e["engine"] == e["reference"]), None)
    others = [e for e in sel if e["engine"] != e["reference"]][:6]
    weight = lambda r: r["op"] in ("Conv", "Gemm", "MatMul") or r["op"].startswith("sparsecnn::")  # noqa: E731
    base_rows = [r for r in (ref or others[0])["rows"] if weight(r)]
    names = [r["name"] for r in base_rows]
    short = [_short(n) for n in names]
    fig, (ax_t, ax_s) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(names) + 2), 7.5), sharex=True)
    colors = {"cudnn": "#4c72b0", "cudnn_nhwc": "#55a868", "im2col": "#c44e52", "im2col_nhwc": "#dd8452"}
    if ref:
        chosen = [next(iter((r.get("choices") or {}).values()), {}).get("chosen") for r in base_rows]
        ax_t.bar(range(len(names)), [r["ms"] for r in base_rows],
                 color=[colors.get(c, "#8c8c8c") for c in chosen])
        for mode, col in colors.items():
            if mode in chosen:
                ax_t.bar([0], [0], color=col, label=f"chosen: {MODE_SHORT[mode]}")
        ax_t.set_title(f"{model}, {regime}, batch {batch}: {ref['engine']} per layer")
        if any(chosen):
            ax_t.legend(fontsize=7)
    ax_t.set_ylabel("layer time (ms)")
    ax_t.grid(True, axis="y", alpha=0.3)
    width = 0.8 / max(1, len(others))
    for k, e in enumerate(others):
        by_name, library = {}, {}
        for r in e["rows"]:
            for m in r.get("matched") or []:
                if r.get("speedup") is not None:
                    by_name[m] = r["speedup"]
                    if r.get("library"):  # an engine choosing per layer among libraries (hybrid): who won
                        library[m] = "pecr" if r.get("format") == "pecr" else r["library"]
        vals = [by_name.get(n, 0.0) for n in names]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
        if library:
            ax_s.bar(xs, vals, width, color=[LIBRARY_COLOURS.get(library.get(n), "#dddddd") for n in names],
                     edgecolor="black", linewidth=0.4)
            for lib in dict.fromkeys(library.values()):
                ax_s.bar([0], [0], color=LIBRARY_COLOURS.get(lib, "#dddddd"), label=f"{e['engine']}: {lib}")
        else:
            ax_s.bar(xs, vals, width, label=e["engine"])
    ax_s.axhline(1.0, color="black", lw=1, ls="--")
    ax_s.set_ylabel(f"speedup over {ref['engine'] if ref else 'dense'} layer (×)")
    ax_s.set_xlabel("layer (weight layers in network order)")
    ax_s.set_xticks(range(len(names)))
    ax_s.set_xticklabels(short, rotation=70, fontsize=7)
    ax_s.grid(True, axis="y", alpha=0.3)
    if others:
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _short(name: str) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0/conv1'; '/features/features.0/Conv' -> 'features.0'."""
    parts = [p for p in name.replace("::", "/").split("/") if p]
    if len(parts) >= 4:
        return f"{parts[-3]}/{parts[-2]}"
    return parts[-2] if len(parts) >= 2 else name[-18:]


def plot_summary(result: dict):
    """Table 1 style: speedup over the best dense engine per model and engine, size and accuracy."""
    plt = _plt()
    summ = [r for r in result.get("summary") or [] if r.get("speedup_vs_best_dense")]
    if not summ:
        return None
    batch = min(r["batch"] for r in summ)
    regimes = list(dict.fromkeys(r["regime"] for r in summ))
    fig, axes = plt.subplots(len(regimes), 1, figsize=(11, 3.8 * len(regimes)), squeeze=False)
    for ax, regime in zip(axes[:, 0], regimes):
        sel = [r for r in summ if r["regime"] == regime and r["batch"] == batch]
        models = list(dict.fromkeys(r["model"] for r in sel))
        engines = list(dict.fromkeys(f"{r['engine']}" for r in sel))
        width = 0.8 / max(1, len(engines))
        for k, eng in enumerate(engines):
            xs, ys, notes = [], [], []
            for i, m in enumerate(models):
                r = next((r for r in sel if r["model"] == m and r["engine"] == eng), None)
                if r is None:
                    continue
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(r["speedup_vs_best_dense"])
                note = f"{r['median_ms']:.3g} ms"
                if r.get("model_mb"):
                    note += f"\n{r['model_mb']:.3g} MB"
                if r.get("top1") is not None:
                    note += f"\ntop-1 {100 * r['top1']:.1f}%"
                notes.append(note)
            bars = ax.bar(xs, ys, width, label=eng)
            for b, note in zip(bars, notes):
                ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=5.5, xytext=(0, 1), textcoords="offset points")
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_xlabel("model")
        ax.set_ylabel("speedup over best dense (×)")
        ax.set_title(f"{regime}, batch {batch}: whole network (labels: latency, model size, accuracy)")
        ax.set_ylim(0, max(r["speedup_vs_best_dense"] for r in sel) * 1.35)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def write_reports(result: dict, out: Path, json_name: str = "bench.json") -> list[str]:
    """Markdown and plots from a result dict (also used to re-render a saved JSON)."""
    plt = _plt()
    written = []
    card = result.get("env", {}).get("card", "")
    figs = []
    if result.get("gemm") and result["gemm"].get("rows"):
        figs.append(("gemm_speedup.png", plot_gemm_speedup(result["gemm"], card)))
    key, _ = _pick_layers(result, None)
    if key:
        figs.append((f"layers_{Path(key[0]).stem}.png", plot_layers(result)))
    if result.get("summary"):
        figs.append(("summary.png", plot_summary(result)))
    for name, fig in figs:
        if fig is None:
            continue
        _save(fig, out / name)
        plt.close(fig)
        written.append(name)
    result["files"] = sorted(set(result.get("files", [])) | set(written) | {json_name, "bench.md"})
    write_text_atomic(out / "bench.md", markdown(result))
    return written


def rerender(src, out: Path, accuracy: dict | None = None) -> list[str]:
    """Tables and plots again from a saved bench.json (with `accuracy`, a new summary): `--report-only`."""
    from .bench import summary_rows

    src = Path(src)
    result = read_json(src, "bench result", "give the bench.json that `sparsecnn bench` wrote")
    if not isinstance(result, dict) or result.get("schema") != "sparsecnn-bench":
        raise UserError(f"{src} is not a `sparsecnn bench` result (no schema 'sparsecnn-bench')")
    out.mkdir(parents=True, exist_ok=True)
    if accuracy is not None:
        result["summary"] = summary_rows(result["networks"], result["models"], accuracy)
    files = write_reports(result, out)
    write_json(result, out / "bench.json")
    return files
