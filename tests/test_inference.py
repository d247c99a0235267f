"""`run` over a folder streams (converter/inference.py): batches read as they are needed, outputs
written as they come into an .npz that appears whole or not at all, a progress bar on a terminal;
`--timing` states trtexec's numbers; a saved engine refuses settings it was not built with."""
import io
import re
import warnings

import numpy as np
import pytest
import torch

from helpers import cli, fails
from sparsecnn.converter.cli import main
from sparsecnn.converter.inference import NpzWriter, timing_lines
from sparsecnn.runtimes.timing import Timing


@pytest.fixture
def photos(tmp_path):
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (24 + i, 40 - i, 3), dtype=np.uint8)).save(d / f"img{i}.jpg")
    return d


def test_a_folder_in_batches_gives_the_outputs_of_one_batch(capsys, tmp_path, photos):
    runs = {}
    for batch in (3, 7):
        out_file = tmp_path / f"b{batch}.npz"
        code, out, err = cli(capsys, "run", "tinyresnet", "--input", photos, "--batch", batch, "--device", "cpu",
                             "--save-inputs", "-o", out_file)
        assert code == 0, err
        assert f"7 images in {-(-7 // batch)} batch" in out
        runs[batch] = ([line.split(":")[0] for line in out.splitlines() if line.startswith("img")], np.load(out_file))
    (names3, z3), (names7, z7) = runs[3], runs[7]
    assert names3 == names7 == [f"img{i}.jpg" for i in range(7)]
    assert z3.files == z7.files == ["logits", "input"]
    np.testing.assert_array_equal(z3["input"], z7["input"])
    # the same convolutions at another batch size: equal up to the CPU kernels' summation order
    np.testing.assert_allclose(z3["logits"], z7["logits"], rtol=0, atol=1e-6)  # measured: 4e-9 apart


def test_images_are_read_one_batch_at_a_time(capsys, monkeypatch, photos):
    from sparsecnn.converter import images
    from sparsecnn.runtimes.base import Engine

    events = []
    load, call = images.load_images, Engine.__call__
    monkeypatch.setattr(images, "load_images", lambda files, spec: events.append(len(files)) or load(files, spec))
    monkeypatch.setattr(Engine, "__call__", lambda self, *xs: events.append("run") or call(self, *xs))
    code, _, err = cli(capsys, "run", "tinynet", "--input", photos, "--batch", 3, "--device", "cpu")
    assert code == 0, err
    assert events == [3, "run", 3, "run", 1, "run"]


def test_a_fixed_batch_pads_the_last_one(capsys, tmp_path, photos):
    """An ONNX file with a fixed batch of 2 runs 7 images as 4 batches; the padding's outputs are dropped."""
    from sparsecnn.models import load_model

    module = load_model("tinynet")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 3, 32, 32),), str(tmp_path / "b2.onnx"), dynamo=False)
    code, out, err = cli(capsys, "run", tmp_path / "b2.onnx", "--input", photos, "--mean", "0.5", "--std", "0.5",
                         "--device", "cpu", "-o", tmp_path / "o.npz", "--save-inputs")
    assert code == 0, err
    assert "7 images in 4 batches of 2" in out
    with np.load(tmp_path / "o.npz") as z:
        logits, x = z[z.files[0]], z[z.files[1]]
    assert logits.shape == (7, 10) and x.shape == (7, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(logits, module(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-4)


def test_npz_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "o.npz"
    with NpzWriter(target, rows=5) as w:
        for i in range(0, 5, 2):
            rows = min(2, 5 - i)
            w.add("out/a", np.full((rows, 3), i, np.float32))
            w.add("x", np.arange(rows * 4, dtype=np.int64).reshape(rows, 2, 2))
        w.commit()
    with np.load(target) as z:
        assert z.files == ["out/a", "x"]
        np.testing.assert_array_equal(z["out/a"][:, 0], [0, 0, 2, 2, 4])
        assert z["x"].shape == (5, 2, 2) and z["x"].dtype == np.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npz"]  # its parts are gone

    other = tmp_path / "p.npz"
    with NpzWriter(other, rows=5) as w:  # a run that stops early: no file, no parts
        w.add("a", np.zeros((2, 3), np.float32))
        with pytest.raises(ValueError, match="2 of its 5 rows"):
            w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npz"]


def test_a_run_that_fails_midway_leaves_no_output(capsys, tmp_path, photos, monkeypatch):
    from sparsecnn.converter import images

    load = images.load_images
    monkeypatch.setattr(images, "load_images", lambda files, spec: load(files, spec) if files[0].name != "img6.jpg"
                        else (_ for _ in ()).throw(MemoryError()))
    code, _, err = cli(capsys, "run", "tinynet", "--input", photos, "--batch", 2, "--device", "cpu",
                       "-o", tmp_path / "o.npz")
    assert code == 2 and "out of host memory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal_unless_no_progress(capsys, monkeypatch, photos, quiet):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    code = main(["run", "tinynet", "--input", str(photos), "--batch", "2", "--device", "cpu"]
                + (["--no-progress"] if quiet else []))
    assert code == 0
    assert ("/7 [" in term.getvalue()) is not quiet, term.getvalue()  # tqdm: "2/7 [00:00<00:00, 55.2img/s]"
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("img")]) == 7


def test_timing_states_trtexec_numbers_and_keeps_set_up_apart(capsys):
    code, out, err = cli(capsys, "run", "tinynet", "--batch", 4, "--device", "cpu", "--timing", "--warmup", 2,
                         "--iterations", 12)
    assert code == 0, err
    assert re.search(r"set-up \d+\.\d\d s, first batch \d+\.\d ms", out)
    line = next(line for line in out.splitlines() if line.startswith("timing"))
    assert "(cpu-clock, batch 4): 2 warm-up, 12 iterations" in line
    nums = dict(re.findall(r"(min|median|mean|p90|p99) (\d+\.\d+)", line))
    assert set(nums) == {"min", "median", "mean", "p90", "p99"}
    assert float(nums["min"]) <= float(nums["median"]) <= float(nums["p90"]) <= float(nums["p99"])
    assert re.search(r"throughput \d+\.\d images/s", line)


def test_timing_warns_when_the_spread_makes_it_meaningless():
    steady = Timing(10.0, 10.2, 9.9, 5, [9.9, 10.0, 10.0, 10.1, 10.2], how="cuda-events")
    noisy = Timing(10.0, 16.0, 8.0, 5, [8.0, 10.0, 10.0, 12.0, 16.0], how="cpu-clock")
    assert len(timing_lines(steady, 32, 10)) == 1
    lines = timing_lines(noisy, 32, 10)
    assert len(lines) == 2 and lines[1].startswith("warning: the samples spread 80%")
    assert "mean 11.200" in lines[0] and "p99 16.000" in lines[0]
    assert "throughput 2857.1 images/s" in lines[0]  # 32 images x 5 calls in 56 ms


@pytest.fixture(scope="module")
def engine_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eng") / "t.engine"
    assert main(["convert", "tinynet", "-o", str(path.with_suffix(".onnx")), "--runtime", "torch", "--engine",
                 str(path), "--device", "cpu"]) == 0
    return path


@pytest.mark.parametrize("flags,match", [
    (["--runtime", "csr"], r"holds a torch engine \(dtype fp32, tf32 off.*not with --runtime csr: drop it"),
    (["--dtype", "fp16", "--tf32"], "not with --dtype fp16 --tf32: drop them"),
    (["--option", "dense_conv=best"], "not with --option dense_conv=best"),
    (["--option", "no_such_key=1"], "unknown option 'no_such_key' for runtime 'torch'"),
])
def test_an_engine_runs_as_built(capsys, engine_file, flags, match):
    fails(capsys, "run", engine_file, "--device", "cpu", *flags, match=match)


def test_an_engine_accepts_the_settings_it_holds(capsys, engine_file):
    code, out, err = cli(capsys, "run", engine_file, "--device", "cpu", "--runtime", "torch", "--dtype", "fp32",
                         "--option", "dense_conv=cudnn")
    assert code == 0 and "ran torch on cpu (fp32)" in out, err
