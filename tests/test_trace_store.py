"""Trace store: exact round trips, resume, atomic shards, concurrent writers and every refusal path."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cqpolicy.tracing import KEY_COLUMNS, SCHEMA_VERSION, RunInfo, TraceError, TraceReader, TraceWriter

SCHEMA = pa.schema([("seed", pa.int64()), ("cfg_branch", pa.int8()), ("step", pa.int16()), ("block", pa.int16()),
                    ("unit", pa.string()), ("rel_l1", pa.float32()), ("entropy", pa.float32()),
                    ("tokens", pa.int32()), ("err_if_skipped", pa.float32())])
LABELS = ("err_if_skipped",)
UNITS = ("mlp", "attn", "norm")


def info(**over) -> RunInfo:
    kw = dict(model_id="fmnist-dit", model_hash="abc123", scheduler="ddim", steps=3, guidance_scale=2.0,
              policy="none", extra={"num_classes": 10})
    kw.update(over)
    return RunInfo(**kw)


def rows(first: int, last: int, steps: int = 3, seed_rng: int = 0) -> pa.Table:
    """All rows of seeds first..last in shuffled order, with distinct (non-trivial) float values."""
    keys = [(s, c, t, b, u) for s in range(first, last + 1) for c in (0, 1) for t in range(steps)
            for b in (0, 1) for u in UNITS]
    rng = np.random.default_rng(seed_rng + first)
    order = rng.permutation(len(keys))
    keys = [keys[i] for i in order]
    n = len(keys)
    cols = dict(zip(KEY_COLUMNS, map(list, zip(*keys))))
    label = rng.random(n).astype(np.float32)
    label[::4] = np.nan  # "not probed"
    return pa.table({**cols, "rel_l1": rng.random(n).astype(np.float32) * 1e-3 + np.float32(1 / 3),
                     "entropy": rng.random(n).astype(np.float32), "tokens": rng.integers(0, 50, n).astype(np.int32),
                     "err_if_skipped": label}, schema=SCHEMA)


def writer(path, **over) -> TraceWriter:
    return TraceWriter(path, over.pop("info", info()), over.pop("schema", SCHEMA),
                       label_columns=over.pop("label_columns", LABELS))


def sort_keys(t: pa.Table) -> pa.Table:
    return t.sort_by([(c, "ascending") for c in KEY_COLUMNS])


def assert_bit_equal(got: pa.Table, want: pa.Table) -> None:
    """Equal values bit for bit (so NaN == NaN), column by column."""
    assert got.schema.equals(want.schema) and got.num_rows == want.num_rows
    for name in want.column_names:
        g, w = got[name].to_numpy(), want[name].to_numpy()
        if g.dtype.kind == "f":
            g, w = g.view(f"u{g.itemsize}"), w.view(f"u{w.itemsize}")
        assert np.array_equal(g, w), name


def snapshot(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_round_trip_is_exact_and_sorted(tmp_path):
    run = tmp_path / "traces" / "r"
    w = writer(run)
    a, b = rows(0, 1), rows(2, 4)
    assert w.write_shard(b).name == "shard-2-4.parquet"
    w.write_shard(a)
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "shard-0-1.parquet", "shard-2-4.parquet"]

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["model_hash"] == "abc123"
    assert manifest["steps"] == 3 and manifest["guidance_scale"] == 2.0 and manifest["num_classes"] == 10
    assert manifest["columns"]["unit"] == "string" and manifest["columns"]["rel_l1"] == "float"
    assert list(manifest["columns"]) == SCHEMA.names
    kv = pq.read_metadata(run / "shard-2-4.parquet").metadata
    assert kv[b"first_seed"] == b"2" and kv[b"last_seed"] == b"4" and kv[b"model_hash"] == b"abc123"
    assert kv[b"steps"] == b"3" and kv[b"schema_version"] == str(SCHEMA_VERSION).encode()

    r = TraceReader([run], expect_model_hash="abc123", expect_steps=3)
    got = r.table()
    want = sort_keys(pa.concat_tables([a, b]))
    assert got.schema.equals(SCHEMA) and got.num_rows == want.num_rows
    assert_bit_equal(got, want)  # NaN labels included, in key order
    assert r.seeds() == [0, 1, 2, 3, 4]
    assert r.manifest["model_id"] == "fmnist-dit"
    assert RunInfo.from_manifest(r.manifest) == info()
    assert r.table(["entropy", "seed"]).column_names == ["entropy", "seed"]
    with pytest.raises(TraceError, match="unknown trace columns nope"):
        r.table(["nope"])


def test_resume_sees_done_seeds_and_never_overwrites(tmp_path):
    run = tmp_path / "r"
    writer(run).write_shard(rows(0, 1))
    before = snapshot(run)

    again = writer(run)
    assert again.done_seeds() == {0, 1}
    with pytest.raises(TraceError, match=r"already holds seeds \[1\]"):
        again.write_shard(rows(1, 2))
    assert snapshot(run) == before  # manifest and shard untouched, no new file
    again.write_shard(rows(2, 3))
    assert again.done_seeds() == {0, 1, 2, 3}
    assert TraceReader([run]).table().num_rows == 4 * rows(0, 0).num_rows


def test_killed_write_is_ignored_then_cleaned(tmp_path):
    run = tmp_path / "r"
    w = writer(run)
    w.write_shard(rows(0, 1))
    full = (run / "shard-0-1.parquet").read_bytes()
    killed = run / ".shard-2-3.parquet.tmp"  # what a writer killed mid-write leaves behind
    killed.write_bytes(full[: len(full) // 2])
    dead = run / f".shard-4-5.parquet~{_exited_pid()}@{socket.gethostname()}~0a0b.tmp"  # writer exited
    dead.write_bytes(b"partial")
    live = run / f".shard-6-7.parquet~{os.getppid()}@{socket.gethostname()}~0c0d.tmp"  # parent is alive
    live.write_bytes(b"in progress")

    assert w.done_seeds() == {0, 1}
    r = TraceReader([run])
    assert r.seeds() == [0, 1] and r.table().num_rows == rows(0, 1).num_rows

    assert w.remove_stale_temporaries() == 2
    assert not killed.exists() and not dead.exists() and live.exists()
    assert (run / "shard-0-1.parquet").read_bytes() == full


def _exited_pid() -> int:
    """A pid whose process has certainly exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_two_writers_disjoint_ranges_every_row_once(tmp_path):
    run = tmp_path / "r"
    w1, w2 = writer(run), writer(run)  # both open the same fresh folder
    w1.write_shard(rows(0, 1))
    w2.write_shard(rows(2, 2))
    w1.write_shard(rows(3, 4))
    with pytest.raises(TraceError, match="already holds"):
        w2.write_shard(rows(4, 5))  # w2 sees w1's shard written after w2 was opened
    t = TraceReader([run]).table()
    assert t.num_rows == 5 * rows(0, 0).num_rows
    assert t.group_by(list(KEY_COLUMNS)).aggregate([]).num_rows == t.num_rows
    assert sorted(set(t["seed"].to_pylist())) == [0, 1, 2, 3, 4]


def test_concurrent_first_open_creates_one_manifest(tmp_path):
    run = tmp_path / "r"
    barrier, results = threading.Barrier(6), []

    def start(model_hash):
        barrier.wait()
        try:
            writer(run, info=info(model_hash=model_hash))
            results.append(model_hash)
        except TraceError:
            results.append("refused")

    threads = [threading.Thread(target=start, args=(h,)) for h in ["a", "b"] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = json.loads((run / "manifest.json").read_text())["model_hash"]
    assert sorted(results) == sorted([winner] * 3 + ["refused"] * 3)
    assert [p.name for p in run.iterdir()] == ["manifest.json"]  # no temporaries left


@pytest.mark.parametrize("kwargs, match", [
    (dict(info=info(model_hash="zzz")), "holds another run: model_hash 'abc123' != 'zzz'"),
    (dict(info=info(steps=4)), "holds another run: steps 3 != 4"),
    (dict(schema=SCHEMA.append(pa.field("extra_signal", pa.float32()))), "columns differ .*extra extra_signal"),
    (dict(label_columns=()), "label_columns"),
])
def test_manifest_mismatch_refused_and_unchanged(tmp_path, kwargs, match):
    run = tmp_path / "r"
    writer(run).write_shard(rows(0, 0))
    before = snapshot(run)
    with pytest.raises(TraceError, match=match):
        writer(run, **kwargs)
    assert snapshot(run) == before
    # extra is not part of a run's identity; it may not shadow keys the store relies on
    writer(run, info=info(extra={"note": "resumed", "package_version": "0.1.0+dev"}))
    with pytest.raises(TraceError, match="may not use manifest keys: model_hash"):
        info(extra={"model_hash": "x"})


def test_foreign_folder_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TraceError, match="is not a trace run"):
        writer(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_wrong_schema_version_refused(tmp_path):
    run = tmp_path / "r"
    writer(run).write_shard(rows(0, 0))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match=f"schema_version 99.*schema_version {SCHEMA_VERSION}"):
        TraceReader([run])
    with pytest.raises(TraceError, match="schema_version 99"):
        writer(run)


def test_truncated_shard_named(tmp_path):
    run = tmp_path / "r"
    writer(run).write_shard(rows(0, 0))
    writer(run).write_shard(rows(1, 2))
    shard = run / "shard-1-2.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="shard-1-2.parquet is truncated or corrupt"):
        TraceReader([run])
    with pytest.raises(TraceError, match="shard-1-2.parquet"):
        writer(run).done_seeds()


def test_shard_metadata_must_match_manifest(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    writer(a).write_shard(rows(0, 0))
    writer(b, info=info(model_hash="other")).write_shard(rows(5, 5))
    os.replace(b / "shard-5-5.parquet", a / "shard-5-5.parquet")  # a shard copied into the wrong run
    with pytest.raises(TraceError, match="shard-5-5.parquet disagrees .*model_hash other != abc123"):
        TraceReader([a])


def test_nan_in_feature_refused_nan_in_label_kept(tmp_path):
    run = tmp_path / "r"
    w = writer(run)
    t = rows(0, 0)
    rel = t["rel_l1"].to_numpy().copy()
    rel[3] = np.nan
    bad = t.set_column(t.schema.get_field_index("rel_l1"), "rel_l1", pa.array(rel))
    with pytest.raises(TraceError, match="'rel_l1' holds 1 NaN/inf"):
        w.write_shard(bad)
    rel[3] = np.inf
    with pytest.raises(TraceError, match="'rel_l1' holds 1 NaN/inf"):
        w.write_shard(t.set_column(t.schema.get_field_index("rel_l1"), "rel_l1", pa.array(rel)))
    assert w.done_seeds() == set()

    w.write_shard(t)  # the label column holds NaN ("not probed")
    labels = TraceReader([run]).tensors(["err_if_skipped"])["err_if_skipped"]
    n_nan = int(np.isnan(t["err_if_skipped"].to_numpy()).sum())
    assert n_nan > 0 and int(torch.isnan(labels).sum()) == n_nan


def test_write_shard_refuses_bad_tables(tmp_path):
    w = writer(tmp_path / "r")
    t = rows(0, 0)
    with pytest.raises(TraceError, match="1 duplicate"):
        w.write_shard(pa.concat_tables([t, t.slice(0, 1)]))
    with pytest.raises(TraceError, match="contiguous"):
        w.write_shard(pa.concat_tables([t, rows(2, 2)]))
    with pytest.raises(TraceError, match="schema differs.*missing tokens"):
        w.write_shard(t.drop_columns(["tokens"]))
    with pytest.raises(TraceError, match="must be int16"):
        TraceWriter(tmp_path / "s", info(), SCHEMA.set(2, pa.field("step", pa.int32())))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["manifest.json"]


def test_reader_refuses_mixed_runs_and_empty_runs(tmp_path):
    a, b, c, d = (tmp_path / n for n in "abcd")
    writer(a).write_shard(rows(0, 1))
    writer(b, info=info(steps=4)).write_shard(rows(2, 3, steps=4))
    writer(c, info=info(policy="other")).write_shard(rows(1, 1))
    writer(d)
    with pytest.raises(TraceError, match="different steps"):
        TraceReader([a, b])
    with pytest.raises(TraceError, match="expected 4"):
        TraceReader([a], expect_steps=4)
    with pytest.raises(TraceError, match="expected 'nope'"):
        TraceReader([a], expect_model_hash="nope")
    with pytest.raises(TraceError, match="duplicate keys.*seeds 1-1"):
        TraceReader([a, c])
    with pytest.raises(TraceError, match="holds no trace shards"):
        TraceReader([d])
    assert TraceReader([b], expect_steps=4).seeds() == [2, 3]


def test_tensors_dtypes_codes_and_batches(tmp_path):
    run = tmp_path / "r"
    writer(run).write_shard(rows(0, 1))
    r = TraceReader(run)
    cols = ["seed", "cfg_branch", "step", "block", "unit", "rel_l1", "tokens"]
    ts = r.tensors(cols)
    t = r.table(cols)
    assert {k: v.dtype for k, v in ts.items()} == {"seed": torch.int64, "cfg_branch": torch.int64,
                                                   "step": torch.int64, "block": torch.int64, "unit": torch.int64,
                                                   "rel_l1": torch.float32, "tokens": torch.int64}
    assert r.categories["unit"] == sorted(UNITS)
    assert [r.categories["unit"][i] for i in ts["unit"].tolist()] == t["unit"].to_pylist()
    assert torch.equal(ts["rel_l1"], torch.from_numpy(t["rel_l1"].to_numpy().copy()))
    assert ts["step"].tolist() == t["step"].to_pylist()

    fixed = r.tensors(["unit"], categories={"unit": ["norm", "mlp", "attn", "ff"]})["unit"]
    assert [["norm", "mlp", "attn", "ff"][i] for i in fixed.tolist()] == t["unit"].to_pylist()
    with pytest.raises(TraceError, match="outside the given categories"):
        r.tensors(["unit"], categories={"unit": ["mlp"]})

    batches = list(r.iter_batches(["rel_l1", "unit"], batch_size=7))
    assert all(len(b["rel_l1"]) == 7 for b in batches[:-1]) and 0 < len(batches[-1]["rel_l1"]) <= 7
    assert torch.equal(torch.cat([b["rel_l1"] for b in batches]), ts["rel_l1"])
    assert torch.equal(torch.cat([b["unit"] for b in batches]), ts["unit"])
    assert not torch.isnan(ts["rel_l1"]).any()
