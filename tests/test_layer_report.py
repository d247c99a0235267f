"""The per-layer report (converter/layer_report.py) as convert --engine, inspect and bench show it;
`--json FILE|-`; exit codes and the closed pipe of the CLI. CPU only: engines from the runtimes' CPU
reference paths, decisions from the real chooser on the CPU."""
import json
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import Separable, cli as run_cli
from sparsecnn.converter.cli import main


@pytest.fixture(scope="module")
def csr_engine(tmp_path_factory):
    """tinynet pruned to 0.9, rewritten for csr and compiled on the CPU (its reference kernels)."""
    d = tmp_path_factory.mktemp("csr")
    files = {"onnx": d / "t.onnx", "engine": d / "t.engine", "sparse": d / "t-csr.onnx", "json": d / "report.json"}
    code = main(["convert", "tinynet", "--prune", "0.9", "-o", str(files["onnx"]), "--runtime", "csr",
                 "--device", "cpu", "--engine", str(files["engine"]), "--sparse-onnx", str(files["sparse"]),
                 "--json", str(files["json"])])
    assert code == 0
    return files


def _rows(report):
    return {r["name"]: r for r in report["layers"]}


def test_convert_engine_reports_rules_sparsity_kernels_and_writes_its_json(csr_engine, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "convert", "tinynet", "--prune", "0.9", "-o", tmp_path / "t.onnx", "--runtime",
                           "csr", "--device", "cpu", "--engine", tmp_path / "t.engine")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("/")}
    # the stem and the classifier are kept dense, and the table says by which rule
    assert "dense: stem (reads the input)" in lines["/features/features.0/Conv"]
    assert "dense: head (feeds an output)" in lines["/classifier/Gemm"]
    # a pruned layer: its sparsity and the CSR kernel the CPU path runs
    pruned = lines["/features/features.4/Conv"]
    assert "0.900" in pruned and "pruned" in pruned and "reference (torch sparse CSR" in pruned
    assert "on sparse kernels (csr on cpu, fp32)" in out and "sparsecnn::CsrConv" in out

    report = json.loads(csr_engine["json"].read_text(encoding="utf-8"))
    assert report["schema"] == "sparsecnn-layer-report" and report["runtime"] == "csr"
    rows = _rows(report)
    assert rows["/features/features.0/Conv"]["pruning"] == "dense"
    assert rows["/features/features.0/Conv"]["rule"] == "stem (reads the input)"
    assert rows["/classifier/Gemm"]["rule"] == "head (feeds an output)"
    conv = rows["/features/features.8/Conv"]
    assert conv["pruning"] == "pruned" and conv["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert conv["runs_as"] == "sparsecnn::CsrConv" and conv["format"] == "csr"
    assert report["summary"]["pruned"] == 2 and report["summary"]["dense"] == 2
    assert report["summary"]["sparse_kernels"] == 2


def test_inspect_reads_an_engine_file(csr_engine, capsys):
    code, out, _ = run_cli(capsys, "inspect", csr_engine["engine"])
    assert code == 0
    assert "runs as" in out and "reference (torch sparse CSR" in out
    assert "dense: stem (reads the input)" in out
    assert "custom ops (2, domain sparsecnn" in out and "sparsecnn::CsrConv" in out
    code, out, _ = run_cli(capsys, "inspect", csr_engine["engine"], "--json", "-")
    report = json.loads(out)  # stdout holds the JSON alone
    assert report["runtime"] == "csr" and report["device"] == "cpu" and report["dtype"] == "fp32"
    assert _rows(report)["/features/features.4/Conv"]["kernel"].startswith("reference (torch sparse CSR")


def test_inspect_reads_an_engine_file_saved_before_engines_kept_their_report(csr_engine, capsys, tmp_path):
    old = tmp_path / "old.engine"
    with zipfile.ZipFile(csr_engine["engine"]) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "engine.json":
                manifest = json.loads(data)
                manifest.pop("report")
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    code, out, _ = run_cli(capsys, "inspect", old)
    assert code == 0 and "note: an engine file from before" in out and "sparsecnn::CsrConv" in out


def test_inspect_lists_the_custom_ops_of_a_sparse_onnx_file(csr_engine, capsys):
    code, out, _ = run_cli(capsys, "inspect", csr_engine["sparse"], "--json", "-")
    report = json.loads(out)
    ops = {c["name"]: c for c in report["custom_ops"]}
    assert set(ops) == {"/features/features.4/Conv", "/features/features.8/Conv"}
    conv = ops["/features/features.4/Conv"]
    assert conv["op"] == "sparsecnn::CsrConv" and conv["format"] == "csr"
    assert conv["shape"] == [32, 16 * 9] and conv["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert conv["nnz"] == round(32 * 16 * 9 * 0.1) and conv["stored_bytes"] > 0
    assert _rows(report)["/classifier/Gemm"]["rule"] == "head (feeds an output)"
    code, out, _ = run_cli(capsys, "inspect", csr_engine["sparse"])
    assert "custom ops (2, domain sparsecnn" in out and "461 non-zeros" in out


def test_runtime_reason_says_which_candidate_lost_and_why_from_a_real_chooser_decision():
    from sparsecnn.converter.layer_report import runtime_reason
    from sparsecnn.runtimes.chooser import Candidate, Chooser, Decision, Switch

    w = torch.randn(8, 4, 3, 3)
    x = torch.randn(1, 4, 6, 6)
    dense = Candidate("dense:cudnn", lambda a: torch.nn.functional.conv2d(a, w), dense=True)
    wrong = Candidate("csr:broken", lambda a: 2 * torch.nn.functional.conv2d(a, w), dense=False, library="csr")
    decision = Chooser("cpu", reps=3).choose("conv", [dense, wrong], (x,))
    assert decision.chosen == "dense:cudnn"
    step = {"name": "conv", "op": "Conv", **Switch(decision, [dense, wrong]).info}
    why = runtime_reason(step)
    assert "rejected 1 (wrong result: csr:broken)" in why

    won = Decision("conv", "csr:k1", False, "csr", times_ms={"csr:k1": 1.0, "dense:cudnn": 1.5},
                   best_dense="dense:cudnn", best_dense_ms=1.5, reason="1.50x the best dense form (dense:cudnn)")
    assert runtime_reason({"op": "sparsecnn::CsrConv", "choice": won.report()}) == "faster: 1.50x the best dense form"
    lost = Decision("conv", "dense:cudnn", True, times_ms={"csr:k1": 2.0, "dense:cudnn": 1.5}, best_dense="dense:cudnn",
                    best_dense_ms=1.5, reason="dense measured faster (best sparse csr:k1 at 0.75x)")
    assert runtime_reason({"op": "Conv", "choice": lost.report()}).startswith("sparse slower (dense measured faster")


def test_report_rows_from_engine_steps_carry_the_chosen_time():
    from sparsecnn.converter.layer_report import build_report
    from sparsecnn.runtimes.chooser import Decision

    d = Decision("/l", "csr:k1", False, "csr", times_ms={"csr:k1": 0.25, "dense:cudnn": 0.5},
                 best_dense="dense:cudnn", best_dense_ms=0.5, reason="2.00x the best dense form (dense:cudnn)")
    report = build_report(steps=[{"name": "/l", "op": "sparsecnn::CsrConv", "format": "csr", "choice": d.report()},
                                 {"name": "/r", "op": "Relu"}])
    (row,) = report["layers"]  # weight layers only
    assert row["ms"] == 0.25 and row["library"] == "csr" and row["why"] == "faster: 2.00x the best dense form"


def _export(module, size, path):
    torch.onnx.export(module.eval(), (torch.randn(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return path


def _convert_with_report(capsys, src, prune, tmp_path):
    """convert SRC --prune P --json: (exit code, stderr, the report's rows by weight)."""
    code, _, err = run_cli(capsys, "convert", src, "--prune", prune, "-o", tmp_path / "pruned.onnx", "--json",
                           tmp_path / "r.json")
    rows = {r["weight"]: r for r in json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["layers"]} \
        if code == 0 else {}
    return code, err, rows


def test_a_pruned_depthwise_conv_is_warned_about(capsys, tmp_path):
    src = _export(Separable(), 16, tmp_path / "dw.onnx")
    code, err, rows = _convert_with_report(capsys, src, "0.8", tmp_path)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    # one warning per depthwise conv (the grouped conv is not one), each naming its layer and the way out
    assert [w.split(":")[1].strip() for w in warnings] == ["/dw/Conv", "/dw2/Conv"]
    assert all("depthwise conv pruned to 8" in w and "--exclude" in w for w in warnings)
    # the name the warning gives, given back, keeps the layer dense
    excluded = [w.split("--exclude ")[1].strip("'") for w in warnings]
    assert run_cli(capsys, "convert", src, "--prune", "0.8", "-o", tmp_path / "dw-ex.onnx", "--exclude", *excluded)[0] == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert rows["dw.weight"]["rule"] == "depthwise conv (tiny filters)" and rows["dw.weight"]["pruning"] == "pruned"
    assert rows["stem.weight"]["rule"].startswith("stem") and rows["pw.weight"]["rule"] == ""


class _Upsampler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.mid = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.out = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.mid(torch.relu(self.enc(x)))))))


def test_a_conv_transpose_is_listed_dense_with_its_reason(capsys, tmp_path):
    code, _, rows = _convert_with_report(capsys, _export(_Upsampler(), 8, tmp_path / "up.onnx"), "0.9", tmp_path)
    assert code == 0
    up = rows["up.weight"]
    assert up["op"] == "ConvTranspose" and up["pruning"] == "dense" and up["sparsity"] == 0.0
    assert "no runtime has a sparse kernel" in up["rule"]
    assert rows["mid.weight"]["pruning"] == "pruned"  # the conv between stem and head is pruned as before


def test_long_layer_names_keep_their_end_behind_a_visible_marker():
    from sparsecnn.converter.layer_report import build_report, fit_name, format_report

    long = "/backbone/stage4/block12/" + "branch/" * 8 + "conv_final_3x3/Conv"
    text = format_report(build_report(steps=[{"name": long, "op": "Conv", "kernel": "torch.conv"}]), name_width=40)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("…")]
    assert line.split()[0] == "…" + long[-39:] and "conv_final_3x3/Conv" in line
    assert fit_name("short", 40) == "short" and len(fit_name(long, 40)) == 40


def test_json_dash_writes_json_alone_on_stdout(capsys, tmp_path):
    code, out, err = run_cli(capsys, "convert", "tinynet", "--prune", "2:4", "-o", tmp_path / "t.onnx", "--json", "-")
    assert code == 0
    report = json.loads(out)  # nothing else on stdout
    assert report["summary"]["two_four_layers"] == 2 and f"wrote {tmp_path / 't.onnx'}" in err
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "t.onnx", "--json")  # a bare --json is stdout too
    assert json.loads(out)["summary"]["two_four_layers"] == 2
    code, out, _ = run_cli(capsys, "inspect", "tinynet", "--activations", "random", "--samples", "2", "--json", "-")
    assert len(json.loads(out)["layers"]) == 3


def test_compare_json_dash_is_read_back_by_bench_accuracy(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "compare", "tinynet", "--methods", "0.9", "2:4", "--finetune-epochs", "0",
                           "--subset", "20", "--device", "cpu", "--no-progress", "--json", "-")
    assert code == 0
    acc = tmp_path / "compare.json"
    acc.write_text(out, encoding="utf-8")  # compare's own output, as `compare --json FILE` writes it
    from sparsecnn.converter.bench import load_accuracy

    got = load_accuracy(acc)
    rows = {r["method"]: r for r in json.loads(out)["results"][0]["rows"]}
    assert got[("tinynet", "0.9")]["top1"] == pytest.approx(rows["unstructured 90%"]["top1"] / 100)
    assert got[("tinynet", "2:4")]["top1"] == pytest.approx(rows["2:4"]["top1"] / 100)
    assert got[("tinynet", "none")]["top1"] == pytest.approx(rows["dense"]["top1"] / 100)


def test_a_closed_pipe_ends_quietly():
    """A reader that takes one line and closes the pipe (`sparsecnn ... | head -1`): no traceback."""
    for argv in (["inspect", "tinynet"], ["inspect", "--ops"]):
        p = subprocess.Popen([sys.executable, "-m", "sparsecnn.converter.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        assert p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read().decode("utf-8", "replace")
        code = p.wait(timeout=120)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert code in (0, 141), (argv, code, err)


# --- bench: exit status, --option, skipped parts ----------------------------------------------------

def _runtime_module(name: str, error: Exception):
    import types

    from sparsecnn.runtimes import get_runtime

    torch_rt = get_runtime("torch")
    mod = types.ModuleType(f"{name}_runtime")
    mod.name, mod.OPTIONS = name, {}
    mod.available = lambda: (True, "test double")
    mod.rewrite = torch_rt.rewrite

    def compile(model, device="cpu", options=None, state=None):
        raise error

    mod.compile = compile
    return mod


BENCH_SMALL = ["tinynet", "--regimes", "fp32-cuda-core", "--batch", "1", "--dense", "best", "--budget-ms", "2",
               "--repeats", "1", "--no-per-layer", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("error,code,line", [
    (RuntimeError("kernel exploded"), 1, "bench: error: 1 part(s) failed (tinynet fp32-cuda-core batch 1 broken @ 0.9: "
                                         "RuntimeError: kernel exploded)"),
    (None, 0, "bench: 1 part(s) not supported here were skipped (1x runs fp32 only"),
])
def test_bench_exits_1_when_a_part_fails_and_0_when_one_is_unsupported(monkeypatch, capsys, tmp_path, error, code, line):
    from sparsecnn import runtimes
    from sparsecnn.common.errors import UserError

    mod = _runtime_module("broken", error or UserError("runs fp32 only"))
    monkeypatch.setitem(sys.modules, "broken_runtime", mod)
    monkeypatch.setitem(runtimes.RUNTIME_MODULES, "broken", "broken_runtime")
    got, out, err = run_cli(capsys, "bench", *BENCH_SMALL, "--runtimes", "broken,torch", "-o", tmp_path)
    assert got == code, err
    # (without the progress bar bench also prints a 'bench: ...' line per engine built and timed)
    (summary,) = [ln for ln in err.splitlines() if ln.startswith("bench:") and " part(s) " in ln]
    assert summary.startswith(line), summary
    assert (tmp_path / "bench.json").is_file()  # what did run is written all the same
    md = (tmp_path / "bench.md").read_text(encoding="utf-8")
    assert ("## Errors" in md) == (code == 1) and ("## Skipped" in md) == (code == 0)


def test_bench_option_reaches_the_runtimes_that_declare_it(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bench", *BENCH_SMALL, "--runtimes", "csr", "--option", "guard=false",
                           "-o", tmp_path)
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert result["settings"]["runtime_options"] == {"csr": {"guard": False}}
    code, _, err = run_cli(capsys, "bench", *BENCH_SMALL, "--runtimes", "csr", "--option", "nosuch=1",
                           "-o", tmp_path / "x")
    assert code == 2 and "nosuch" in err and len(err.strip().splitlines()) == 1


def test_gemm_sweep_skips_gpu_kernels_and_fp16_csr_on_a_cpu():
    from sparsecnn.converter.gemm_sweep import run_sweep

    got = run_sweep("cpu", shapes=[(8, 36, 16)], sparsities=[0.5], methods=["cublas", "cusparse", "csr"],
                    regimes=["fp32-cuda-core", "fp16"], reps=2, repeats=1, progress=False)
    skipped = {e["where"] for e in got["skipped"]}
    assert skipped == {"gemm csr fp32-cuda-core on cpu", "gemm csr fp16 on cpu", "gemm cusparse fp16 on cpu"}
    assert all(not r.get("error") and r["ok"] for r in got["rows"])
    assert {(r["method"], r["regime"]) for r in got["rows"]} == {("cublas", "fp32-cuda-core"), ("cublas", "fp16"),
                                                                 ("cusparse", "fp32-cuda-core")}


def test_noisy_measurements_mark_their_ratios_unreliable():
    from sparsecnn.converter.bench import BenchConfig, Candidate, _network_rows
    from sparsecnn.converter.bench_report import markdown, outcome_lines, short_table
    from sparsecnn.converter.regimes import REGIMES
    from sparsecnn.runtimes.timing import Timing

    def timed(label, kind, samples_a, samples_b):
        c = Candidate(label, kind, None, None, None)
        c.timings = [Timing(sorted(s)[len(s) // 2], max(s), min(s), len(s), list(s)) for s in (samples_a, samples_b)]
        return c

    steady = [1.0, 1.01, 1.02, 1.0, 1.01]
    cands = [timed("eager", "eager", steady, steady), timed("best dense", "dense", steady, steady),
             timed("csr @ 0.9", "runtime", [0.5, 0.5, 0.5, 2.5, 0.5], [0.9, 0.9, 0.9, 0.9, 0.9])]
    cfg = BenchConfig(["tinynet"], ["csr"], ["0.9"], [REGIMES["fp32"]], [1], torch.device("cpu"))
    rows = {r["engine"]: r for r in _network_rows(cfg, cands, "tinynet", REGIMES["fp32"], 1)}
    assert rows["best dense"]["noisy"] is None and not rows["best dense"]["unreliable_vs_eager"]
    assert "runs differ by" in rows["csr @ 0.9"]["noisy"] and rows["csr @ 0.9"]["unreliable_vs_best_dense"]
    result = {"networks": list(rows.values()), "env": {"device": "cpu"}, "errors": []}
    table = short_table(result)
    assert "?" in next(ln for ln in table.splitlines() if "csr @ 0.9" in ln)
    assert "?" not in next(ln for ln in table.splitlines() if "best dense" in ln)
    lines, failed = outcome_lines(result, "bench.md")
    assert not failed and lines[0].startswith("warning: 1 of 3 network speedups") and "on a CPU" in lines[0]
    assert "rows have a ratio marked ?" in markdown(result)
