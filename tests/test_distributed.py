"""Data-parallel sampling under torchrun (2 gloo processes on CPU) gives what one process gives: the same bench rows
(images, FID, KID, MACs), trace rows and samples; bad launches stop with one line and leave nothing behind; a
killed launch resumes without duplicating a row."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

SAMPLING = ["--num-samples", "6", "--batch-size", "2", "--steps", "3"]  # 3 batches over 2 ranks: uneven shares


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same kernels in every process


def launch(*argv, ranks: int = 1, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """``python argv`` under torchrun with ``ranks`` processes (1: one plain process); past ``timeout`` the
    launcher and every rank are killed, none left waiting at a collective."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    with subprocess.Popen([*launcher, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_env(), start_new_session=True, **popen) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def cqpolicy(*args, ranks: int = 1, check: bool = True, **popen) -> subprocess.CompletedProcess:
    result = launch("-m", "cqpolicy", *args, ranks=ranks, **popen)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


SAME = ("fid", "kid", "macs_per_image", "psnr_vs_baseline", "reuse_ratio", "cache_bytes", "bit_identical",
        "class_accuracy", "policy_config")


def test_two_ranks_bench_the_same_rows_as_one_process(tiny_dit_dir, tmp_path):
    """cache-dit too, which by itself averages its decisions over the ranks of a process group (and then waits for
    a rank with fewer batches forever)."""
    pytest.importorskip("cache_dit")
    policies = ["--policies", "fora:interval=2", "teacache:threshold=0.3", "cache-dit:threshold=0.3,fn=1,warmup=0",
                "--model", tiny_dit_dir, *SAMPLING, "--fid"]
    cqpolicy("bench", *policies, "--out", tmp_path / "one")
    cqpolicy("bench", *policies, "--out", tmp_path / "two", ranks=2)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [r["policy"] for r in one] == [r["policy"] for r in two] and len(one) == 4
    for a, b in zip(one, two):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}, a["policy"]
    assert one[0]["images_sha256"] == two[0]["images_sha256"]
    with np.load(tmp_path / "one" / "work" / "plain-0-6.npz") as a, np.load(tmp_path / "two" / "work" /
                                                                            "plain-0-6.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    assert not list(tmp_path.glob(".two.partial-*"))  # rank 0 committed the one staging folder


def test_two_ranks_trace_and_sample_what_one_process_does(tiny_dit_dir, tmp_path):
    import pandas.testing
    import pyarrow.compute as pc

    from cqpolicy.tracing.store import TraceReader

    trace = ["trace", "--model", tiny_dit_dir, *SAMPLING, "--probes", "local,downstream"]
    cqpolicy(*trace, "--out", tmp_path / "t1")
    cqpolicy(*trace, "--out", tmp_path / "t2", ranks=2)
    keys = [("seed", "ascending"), ("cfg_branch", "ascending"), ("step", "ascending"), ("block", "ascending"),
            ("unit", "ascending")]
    one, two = (TraceReader([tmp_path / t]).table() for t in ("t1", "t2"))
    one, two = (t.take(pc.sort_indices(t, sort_keys=keys)).to_pandas() for t in (one, two))
    assert len(one) > 0
    pandas.testing.assert_frame_equal(one, two, check_exact=True)  # NaN (not probed) where one process has it
    assert len(list((tmp_path / "t2").glob("shard-*.parquet"))) == 3

    sample = ["sample", "--model", tiny_dit_dir, *SAMPLING, "--policy", "fora:interval=2"]
    cqpolicy(*sample, "--out", tmp_path / "s1")
    cqpolicy(*sample, "--out", tmp_path / "s2", ranks=2)
    with np.load(tmp_path / "s1" / "samples.npz") as a, np.load(tmp_path / "s2" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["seeds"], b["seeds"])
    m1, m2 = (json.loads((tmp_path / s / "metrics.json").read_text()) for s in ("s1", "s2"))
    assert m1["macs"] == m2["macs"] and m1["reuse_ratio"] == m2["reuse_ratio"]


def test_more_ranks_than_samples_or_a_folder_another_launch_writes_stop_in_one_line(tiny_dit_dir, tmp_path):
    few = cqpolicy("bench", "--policies", "fora:interval=2", "--model", tiny_dit_dir, "--num-samples", "1",
                   "--steps", "2", "--out", tmp_path / "few", ranks=2, check=False)
    assert few.returncode != 0 and not (tmp_path / "few").exists()
    errors = [line for line in few.stderr.splitlines() if line.startswith("cqpolicy bench: error:")]
    assert errors == ["cqpolicy bench: error: 2 ranks for 1 samples per replicate: launch at most 1 "
                      "(--nproc_per_node x --nnodes)"]

    config = tmp_path / "bench.yaml"
    config.write_text(f"model: {tiny_dit_dir}\nsteps: 2\nnum_samples: 4\nbatch_size: 2\nseeds: [0]\nrepeats: 0\n"
                      f"fid: false\nmethods: [fora:interval=2]\n")
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".cqpolicy.lock", "a+") as held:  # another launch is writing there
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = cqpolicy("bench", "--config", config, "--out", out, check=False)
    assert busy.returncode == 2 and "is being written by another launch" in busy.stderr
    assert sorted(p.name for p in out.iterdir()) == [".cqpolicy.lock"]  # nothing written


def test_a_killed_launch_resumes_without_duplicating_a_row(tiny_dit_dir, tmp_path):
    config = tmp_path / "bench.yaml"
    methods = ["fora:interval=2", "fora:interval=3", "teacache:threshold=0.3", "taylorseer:interval=2"]
    config.write_text(f"model: {tiny_dit_dir}\nsteps: 3\nnum_samples: 6\nbatch_size: 2\nseeds: [0, 1]\nrepeats: 0\n"
                      f"methods: {json.dumps(methods)}\n")
    out = tmp_path / "killed"
    first = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "cqpolicy", "bench", "--config", str(config), "--out", str(out)],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while len(list((out / "rows").glob("*/*.json"))) < 3 and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    first.wait()
    partial = len(list((out / "rows").glob("*/*.json")))
    assert 3 <= partial < 2 * (1 + len(methods)), "the launch finished before it could be killed"
    cqpolicy("bench", "--config", config, "--out", out, ranks=2)  # resumes
    cqpolicy("bench", "--config", config, "--out", tmp_path / "whole")
    rows = {p.relative_to(out / "rows"): json.loads(p.read_text()) for p in (out / "rows").glob("*/*.json")}
    whole = {p.relative_to(tmp_path / "whole" / "rows"): json.loads(p.read_text())
             for p in (tmp_path / "whole" / "rows").glob("*/*.json")}
    assert rows.keys() == whole.keys() and len(rows) == 2 * (1 + len(methods))
    for name, row in rows.items():
        assert {k: row[k] for k in SAME} == {k: whole[name][k] for k in SAME}, name
    board = (out / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + 1 + len(methods)  # one leaderboard row per method: none counted twice


@pytest.mark.parametrize("size, rank, spans", [(1, 0, [(0, 2), (2, 4), (4, 5)]), (2, 0, [(0, 2), (4, 5)]),
                                               (2, 1, [(2, 4)]), (4, 3, [])])
def test_ranks_take_whole_batches_in_turn(size, rank, spans):
    from cqpolicy.distributed import World

    assert World(rank=rank, size=size).batches(5, 2) == spans


def test_one_process_gathers_rows_in_place():
    import torch

    from cqpolicy.distributed import gather_rows

    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(gather_rows(rows, [2, 0, 1], 3), rows[[1, 2, 0]])


def test_outside_torchrun_nothing_starts_a_process_group(monkeypatch):
    import torch.distributed as dist

    from cqpolicy.distributed import World, world

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == World() and not dist.is_initialized()


FAILING_SCRIPT = """
import sys
from cqpolicy.distributed import DistributedError, main_alone, world
rank = world().rank
try:
    with main_alone() as mine:
        if mine:
            raise RuntimeError("rank 0 broke")
except DistributedError as error:
    print(f"rank {rank}: {error}", flush=True)
    sys.exit(2)
"""


def test_when_rank_0_fails_in_a_step_it_runs_alone_the_other_ranks_stop_too(tmp_path):
    """Not at their next collective after the 3 h timeout: they stop with one line, rank 0 with its own error."""
    script = tmp_path / "fails.py"
    script.write_text(FAILING_SCRIPT)
    start = time.monotonic()
    result = launch(script, ranks=2, timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 100
    assert "RuntimeError: rank 0 broke" in result.stderr
    assert "rank 1: another rank failed in a step it ran for all ranks" in result.stdout


TRAIN_SCRIPT = """
import sys
from cqpolicy.training.train import train_policy
for kind in ("mlp", "scheduler"):
    train_policy([sys.argv[1]], kind=kind, out_dir=f"{sys.argv[2]}/{kind}", max_epochs=2, batch_size=16,
                 steps_per_epoch=4, progress=False)
"""


def test_ddp_training_on_two_ranks_writes_the_one_process_artifact(tiny_dit_dir, tmp_path):
    """The MLP (each rank a share of every batch, the loss divided by the whole batch's weight) and the layer
    scheduler (one impact table, on every rank) come out as one process trains them, up to float rounding."""
    import torch
    from safetensors.torch import load_file

    cqpolicy("trace", "--model", tiny_dit_dir, *SAMPLING, "--out", tmp_path / "traces")
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    for ranks, out in ((1, "one"), (2, "two")):
        result = launch(script, tmp_path / "traces", tmp_path / out, ranks=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("mlp", "scheduler"):
        one, two = (load_file(tmp_path / out / kind / "weights.safetensors") for out in ("one", "two"))
        assert one.keys() == two.keys()
        for name in one:
            assert torch.allclose(one[name].float(), two[name].float(), atol=1e-6), (kind, name)
        meta = [json.loads((tmp_path / out / kind / "policy.json").read_text()) for out in ("one", "two")]
        assert meta[0]["training"]["global_step"] == meta[1]["training"]["global_step"] >= 2
        numbers = [{k: v for k, v in m["metrics"].items() if isinstance(v, float)} for m in meta]
        assert numbers[0] == pytest.approx(numbers[1], rel=1e-5)
    assert meta[0]["training"]["global_step"] == 2 * 4  # the scheduler: steps_per_epoch x epochs
    mlp = json.loads((tmp_path / "one" / "mlp" / "policy.json").read_text())
    assert mlp["training"]["global_step"] >= 2 * 3  # several batches an epoch, each shared by the ranks


def test_ddp_gates_training_on_two_ranks_writes_the_one_process_artifact(tiny_dit_dir, tmp_path):
    """The gate net rolls out through the sampler; each rank rolls out half of every batch and divides its loss by
    the whole batch's, so the averaged gradient is the one-process gradient of log(loss)."""
    import torch
    from safetensors.torch import load_file

    for ranks, out in ((1, "one"), (2, "two")):
        cqpolicy("train", "gates", "--model", tiny_dit_dir, "--steps", 6, "--budget-range", 0.3, 0.8,
                 "--train-samples", 8, "--batch-size", 4, "--max-epochs", 2, "--out", tmp_path / out, ranks=ranks)
    one, two = (load_file(tmp_path / out / "weights.safetensors") for out in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name].float(), two[name].float(), atol=1e-5), name
    meta = [json.loads((tmp_path / out / "policy.json").read_text()) for out in ("one", "two")]
    assert meta[0]["training"]["global_step"] == meta[1]["training"]["global_step"] == 2 * 2
    numbers = [{k: v for k, v in m["metrics"].items() if isinstance(v, float) and k != "train_minutes"}
               for m in meta]
    assert numbers[0] == pytest.approx(numbers[1], rel=1e-4)
    result = cqpolicy("train", "gates", "--model", tiny_dit_dir, "--steps", 6, "--train-samples", 8,
                      "--batch-size", 3, "--out", tmp_path / "odd", ranks=2, check=False)
    assert result.returncode != 0 and "must be a multiple of the 2 ranks" in result.stderr
    assert not (tmp_path / "odd").exists()


def test_the_main_job_on_two_ranks_gives_the_one_process_result(tiny_dit_dir, tmp_path, request):
    """`cqpolicy run --quick` under torchrun: traces and bench sharded, MLP / scheduler / gates with DDP, the fits,
    the study and the report on rank 0; the same bench rows and artifacts as one process."""
    import torch
    import yaml
    from safetensors.torch import load_file

    shipped = yaml.safe_load((request.config.rootpath / "configs/fmnist-dit.yaml").read_text())
    shipped["model"] = str(tiny_dit_dir)
    shipped["quick"]["steps"] = 6
    shipped["quick"]["search"]["min_psnr"] = None
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(shipped))
    for ranks, out in ((1, "one"), (2, "two")):
        cqpolicy("run", config, "--quick", "--out", tmp_path / out, ranks=ranks, cwd=tmp_path)
    rows = [json.loads((tmp_path / out / "bench" / "rows.json").read_text()) for out in ("one", "two")]
    key = ("fid", "kid", "macs_speedup", "reuse_ratio", "psnr_vs_baseline")

    def table(rows, out):
        return sorted((r["policy"].replace(str(tmp_path / out), ""), r["seed"], *(r.get(k) for k in key))
                      for r in rows)

    assert table(rows[0], "one") == table(rows[1], "two")
    for artifact in ("mlp", "scheduler", "gates"):
        one, two = (load_file(tmp_path / out / "train" / artifact / "weights.safetensors") for out in ("one", "two"))
        for name in one:
            assert torch.allclose(one[name].float(), two[name].float(), atol=1e-5), (artifact, name)
    for stage in ("traces", "train", "retrain", "search", "bench", "report"):
        assert (tmp_path / "two" / stage / "done.json").is_file(), stage
    assert (tmp_path / "two" / "report" / "grids.png").stat().st_size > 100
