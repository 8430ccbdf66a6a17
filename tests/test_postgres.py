"""A real PostgreSQL server (Debian's packages, on 127.0.0.1 for this module) shared as several hosts would share it:
two `cqpolicy search` workers on one Optuna study, logging to one `cqpolicy tracking-server` over the same server.
Skipped, with one line saying why, where PostgreSQL or its driver is missing or the server cannot start."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cqpolicy.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def postgres():
    """``postgresql://cqpolicy@127.0.0.1:PORT`` of a fresh cluster with databases ``optuna`` and ``mlflow``."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'cqpolicy[postgres]')")
    found = shutil.which("initdb") or (sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [None])[-1]
    if found is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(found).parent
    # PostgreSQL refuses to run as root: as root, run it as the postgres user in a folder that user owns
    # (pytest's tmp folders are private to this user)
    root = Path(tempfile.mkdtemp(prefix="cqpolicy-pg-"))
    as_owner = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None or _run(["id", "postgres"]).returncode != 0:
            pytest.skip("running as root without a postgres user to run PostgreSQL as")
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"
    started = False
    try:
        init = _run(as_owner + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "cqpolicy",
                                "--no-sync", "-E", "UTF8"])
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {(init.stderr.strip().splitlines() or ['?'])[-1]}")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        start = _run(as_owner + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                                 "-o", options, "start"])
        if start.returncode != 0:
            pytest.skip(f"PostgreSQL did not start: {(start.stderr.strip().splitlines() or ['?'])[-1]}")
        started = True
        import psycopg

        with psycopg.connect(f"postgresql://cqpolicy@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            for name in ("optuna", "mlflow"):
                conn.execute(f"CREATE DATABASE {name}")
        yield f"postgresql://cqpolicy@127.0.0.1:{port}"
    finally:
        if started:
            _run(as_owner + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tracking_server(postgres, tmp_path):
    """``cqpolicy tracking-server`` over the ``mlflow`` database: its URL, while it answers."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "cqpolicy", "tracking-server", "--backend-store-uri",
                               f"{postgres}/mlflow", "--artifacts-destination", str(tmp_path / "artifacts"),
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the tracking server did not answer:\n"
                                         + (tmp_path / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield url, port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the IPv4 / IPv6 sockets listening on ``port`` (``/proc/net/tcp*``, state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_two_search_workers_share_one_postgres_study_and_log_to_one_tracking_server(
        postgres, tracking_server, tiny_dit_dir, tmp_path):
    url, port = tracking_server
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only: nothing outside this machine reaches it
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"model": str(tiny_dit_dir), "steps": 6, "num_samples": 4, "batch_size": 4,
                                     "objectives": ["macs_speedup", "fid"],
                                     "families": {"fora": {"interval": {"int": [2, 4]}},
                                                  "teacache": {"threshold": {"float": [0.05, 2.0]}}}}))
    storage = f"{postgres}/optuna"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1"}
    # two workers as two hosts would run them: separate processes, one storage URL, one study name
    workers = [subprocess.Popen([sys.executable, "-m", "cqpolicy", "search", "--config", str(space),
                                 "--storage", storage, "--study-name", "shared", "--n-trials", "2",
                                 "--seed", str(seed)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for seed in (0, 1)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    import mlflow
    import optuna

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # every trial once: numbers drawn from one database
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    client = mlflow.MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("cqpolicy-search")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "study-shared"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    assert len(parents) == 1 and len(children) == 4  # the study's creator opened the parent; both workers nest
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the runs live in PostgreSQL, not in a file next to the server
    import psycopg

    with psycopg.connect(f"{postgres}/mlflow") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == len(runs)


def test_a_database_that_does_not_answer_is_one_line_and_exit_2(postgres, tmp_path, capsys, monkeypatch):
    closed = f"postgresql://cqpolicy@127.0.0.1:{_free_port()}"
    code = main(["tracking-server", "--backend-store-uri", f"{closed}/mlflow", "--port", str(_free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not answer" in err[0]
    code = main(["tracking-server", "--backend-store-uri", f"{postgres}/missing", "--port", str(_free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and '"missing" does not exist' in err[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    code = main(["leaderboard", "--out", str(tmp_path / "board")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not answer" in err[0] and not (tmp_path / "board").exists()


def test_a_password_in_a_database_url_stays_out_of_the_error(capsys, request):
    space = request.config.rootpath / "configs/search/fmnist-dit.yaml"
    url = f"postgresql://cqpolicy:s3cret@127.0.0.1:{_free_port()}/optuna"
    code = main(["search", "--config", str(space), "--n-trials", "1", "--storage", url])
    err = capsys.readouterr().err
    assert code == 2 and "s3cret" not in err and "cqpolicy:***@" in err
