"""`sparsecnn train` and `compare` under torchrun (2 gloo processes on the CPU) against one process:
same losses, the same masks on every rank at every update, those masks in the checkpoint; sharded
data and evaluation (every image once); a failing rank stops the job with its one-line error.
`bench --devices`: configurations split over two CPU "devices", one process each, merged.

Run as a script (`python -m torch.distributed.run ... tests/test_distributed.py OUT -- ARGS`) this
file is the probe each rank runs: the real CLI, with the masks it sets recorded per rank.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="apt-get install -y dataset-fashion-mnist")
SPARSITY = 0.8
# tinynet on 256 Fashion-MNIST images, global batch 32, 2 epochs: 16 steps, masks updated on the way
TRAIN_ARGS = ["train", "tinynet", "--device", "cpu", "--subset", "256", "--eval-subset", "100", "--epochs", "2",
              "--batch-size", "32", "--prune", str(SPARSITY), "--no-progress"]


def _torchrun(out: Path, args: list[str], env: dict | None = None, probe: bool = True) -> subprocess.CompletedProcess:
    """2 processes under torchrun: this file's probe around the CLI, or the CLI itself."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *([__file__, str(out), "--"] if probe else ["-m", "sparsecnn.converter.cli"]), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=full_env)


def _digest(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].detach().cpu().bool().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(per-rank probe outputs, the two-process checkpoint, the one-process checkpoint, the two-process
    printout, the one-process checkpoint's path)."""
    from sparsecnn.converter.cli import main

    tmp = tmp_path_factory.mktemp("dist")
    two = _torchrun(tmp, [*TRAIN_ARGS, "-o", str(tmp / "two.pt")])
    assert two.returncode == 0, two.stderr[-3000:]
    torch.set_num_threads(1)
    assert main([*TRAIN_ARGS, "-o", str(tmp / "one.pt")]) == 0
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return (ranks, torch.load(tmp / "two.pt", weights_only=True), torch.load(tmp / "one.pt", weights_only=True),
            two.stdout + two.stderr, tmp / "one.pt")


@needs_fmnist
def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    ranks, two, one, *_ = runs
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1
    l2 = [row["train_loss"] for row in two["train"]["history"]]
    l1 = [row["train_loss"] for row in one["train"]["history"]]
    assert len(l2) == len(l1) == 2
    # same batches, same augmentation, gradients averaged exactly; only BatchNorm's batch statistics
    # are per rank (16 images instead of 32)
    assert l2 == pytest.approx(l1, rel=0.02)
    assert two["train"]["test_images"] == one["train"]["test_images"] == 100
    assert abs(two["train"]["test_top1"] - one["train"]["test_top1"]) <= 10.0


@needs_fmnist
def test_masks_are_identical_on_every_rank_at_every_update_and_in_the_checkpoint(runs):
    ranks, two, *_ = runs
    updates = [r["digests"] for r in ranks]
    assert len(updates[0]) >= 3 and updates[0] == updates[1]
    last = ranks[0]["last_masks"]
    assert _digest(last) == _digest(ranks[1]["last_masks"])
    assert _digest(ranks[0]["final_zeros"]) == _digest(ranks[1]["final_zeros"])
    state = two["state_dict"]
    assert set(last) and set(last) <= set(state)
    for name, keep in last.items():
        w = state[name]
        assert not bool(w[~keep].any()), f"{name}: a pruned weight is not zero in the checkpoint"
        assert float((w == 0).float().mean()) == pytest.approx(SPARSITY, abs=0.01)


@needs_fmnist
def test_only_rank_0_reports(runs):
    printed = runs[3]
    assert printed.count("wrote ") == 1 and printed.count("train tinynet epoch 2/2") == 1


@needs_fmnist
@pytest.mark.slow
def test_compare_under_two_processes_scores_every_test_image_once(runs, tmp_path):
    import json

    from sparsecnn.converter.cli import main

    ckpt = runs[4]
    args = ["compare", str(ckpt), "--device", "cpu", "--subset", "101", "--finetune-epochs", "0",
            "--methods", "0.8", "--no-progress"]
    two = _torchrun(tmp_path, [*args, "--json", str(tmp_path / "two.json")], probe=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    rows = [{(r["method"], r["variant"]): r for r in json.loads((tmp_path / f"{n}.json").read_text(encoding="utf-8"))["results"][0]
             ["rows"]} for n in ("two", "one")]
    assert set(rows[0]) == set(rows[1]) == {("dense", "-"), ("unstructured 80%", "one-shot")}
    for key in rows[1]:  # 101 images split 50 + 51, gathered: the same numbers as one process
        for metric in ("top1", "top5", "agree_top1"):
            assert rows[0][key][metric] == pytest.approx(rows[1][key][metric], abs=1e-9)
    assert two.stdout.count("wrote ") == 1


def test_shards_cover_every_image_once_and_global_batches_match_one_process():
    from sparsecnn.converter.data import TensorImages, fashion_mnist_spec

    n, batch, world = 23, 8, 3
    data = TensorImages(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8), torch.arange(n))
    spec = fashion_mnist_spec(8)
    assert sorted(i for r in range(world) for i in data.shard(r, world).targets.tolist()) == list(range(n))

    def steps(shard):
        g = torch.Generator().manual_seed(3)
        return [(x, y) for x, y in data.batches(spec, batch, shuffle=True, augment=True, generator=g, shard=shard)]

    whole = steps((0, 1))
    parts = [steps((r, world)) for r in range(world)]
    assert all(len(p) == len(whole) for p in parts)  # 23 = 8 + 8 + 7: the short batch still feeds 3 ranks
    for k, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[k][1] for p in parts]), y)
        assert torch.equal(torch.cat([p[k][0] for p in parts]), x)  # the same augmentation draws
    # a last batch smaller than the ranks is dropped by every rank alike
    assert [len(list(data.batches(spec, 11, shard=(r, 2)))) for r in range(2)] == [2, 2]
    assert [len(list(data.batches(spec, 11, shard=(r, 4)))) for r in range(4)] == [2, 2, 2, 2]


@needs_fmnist
@pytest.mark.slow
def test_a_failing_rank_stops_the_job_with_one_error_line(tmp_path):
    res = _torchrun(tmp_path, [*TRAIN_ARGS, "-o", str(tmp_path / "x.pt")],
                    env={"SPARSECNN_TEST_FAIL_RANK": "1", "SPARSECNN_DIST_TIMEOUT_S": "60"})
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("sparsecnn train: error:")]
    assert errors == ["sparsecnn train: error: rank 1 fails on purpose"]
    assert "[rank0]: Traceback" not in res.stderr  # rank 0 only lost its peer: one line, no traceback
    assert not (tmp_path / "x.pt").exists()


# --- bench over several devices ---------------------------------------------------------------

@pytest.mark.slow
def test_bench_splits_configurations_over_two_cpu_devices_and_names_each(tmp_path):
    import json

    from sparsecnn.converter.cli import main

    args = ["bench", "tinynet", "--quick", "--runtimes", "torch", "--regimes", "fp32", "--dense", "best",
            "--no-per-layer", "--repeats", "1", "--no-progress"]
    assert main([*args, "--devices", "cpu,cpu", "-o", str(tmp_path / "two")]) == 0
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / n / "bench.json").read_text(encoding="utf-8")) for n in ("two", "one"))
    # --quick times batches 1 and 2: one configuration per device, each in its own process
    assert [[c["batch"] for c in s["configurations"]] for s in two["shards"]] == [[1], [2]]
    assert [[c["batch"] for c in s["configurations"]] for s in one["shards"]] == [[1, 2]]
    rows = lambda res: [(r["model"], r["regime"], r["batch"], r["engine"]) for r in res["networks"]]  # noqa: E731
    assert rows(two) == rows(one) and len(rows(one)) == 2 * 3  # eager, best dense, torch @ 0.9 per batch
    assert all(r["device"] == "cpu" and r.get("median_ms") for r in two["networks"])
    assert two["env"]["card"].count("(cpu)") == 2
    assert (tmp_path / "two" / "bench.md").read_text(encoding="utf-8").startswith(f"# sparsecnn bench on {two['env']['card']}")


def test_configurations_go_to_devices_in_contiguous_runs():
    from sparsecnn.converter.bench_shards import split

    configs = list(range(7))
    parts = split(configs, 3)
    assert [c for p in parts for c in p] == configs and [len(p) for p in parts] == [2, 2, 3]
    assert split([1], 2) == [[], [1]]


def _probe(out: Path, argv: list[str]) -> int:
    """One rank: the real `sparsecnn train`, recording every mask it sets and its final model."""
    from sparsecnn.common.errors import UserError
    from sparsecnn.converter import finetune, training
    from sparsecnn.converter.cli import main

    rank = int(os.environ["RANK"])
    digests, last, outcome = [], {}, {}
    set_masks, train_model, fit = finetune.Masker.set_masks, training.train_model, training.fit

    def recording_set_masks(self, masks):
        set_masks(self, masks)
        digests.append(_digest(self.masks))
        last.clear()
        last.update({k: v.detach().cpu().bool() for k, v in self.masks.items()})

    def failing_fit(*a, **k):
        if os.environ.get("SPARSECNN_TEST_FAIL_RANK") == str(rank):
            raise UserError(f"rank {rank} fails on purpose")
        return fit(*a, **k)

    def train_and_keep(*a, **k):
        res = train_model(*a, **k)
        outcome["model"] = res.model
        return res

    finetune.Masker.set_masks = recording_set_masks
    training.train_model = train_and_keep
    training.fit = failing_fit
    code = main(argv)
    if code == 0:
        zeros = {n: p.detach() == 0 for n, p in outcome["model"].named_parameters() if n in last}
        torch.save({"digests": digests, "last_masks": last, "final_zeros": zeros}, out / f"rank{rank}.pt")
    return code


if __name__ == "__main__":
    sep = sys.argv.index("--")
    sys.exit(_probe(Path(sys.argv[1]), sys.argv[sep + 1:]))
