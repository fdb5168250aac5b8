"""Bulk classify/embed: kill -9 + --resume is identical, bad rows are answered, Ray matches local, no torch."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from huse.runtime.bulk import BulkJob, iter_embeddings, read_embeddings, read_predictions, run_bulk
from huse.runtime.errors import HuseError
from tests.models.make_data import write_rows


@pytest.fixture(scope="module")
def big_catalog(tiny_catalog, tmp_path_factory) -> Path:
    """The tiny catalog's 120 products repeated to 2,400 rows (images shared), for runs long enough to kill."""
    folder = tmp_path_factory.mktemp("big")
    shutil.copytree(tiny_catalog.parent / "images", folder / "images")
    lines = tiny_catalog.read_text().splitlines()
    (folder / "catalog.csv").write_text("\n".join([lines[0]] + lines[1:] * 20) + "\n")
    return folder / "catalog.csv"


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "huse.runtime.cli", *map(str, args)]


def test_kill_9_then_resume_is_identical_and_redoes_only_in_flight_shards(tiny_bundle, big_catalog, tmp_path):
    args = ["embed", tiny_bundle, "--data", big_catalog, "--shard-rows", 100, "--batch-size", 32, "--no-progress",
            "--threads", 1]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*args, "--out", ref), check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(*args, "--out", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = tmp_path / "out.partial" / "_manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = json.loads(manifest.read_text())["shards"]
    assert 3 <= len(kept) < 24, "the run finished before it could be killed"
    stamps = {f: os.stat(tmp_path / "out.partial" / f).st_mtime_ns for e in kept.values() for f in e["files"]}
    r = subprocess.run(_cli(*args, "--out", out), capture_output=True, text=True)
    assert r.returncode == 1 and "--resume" in r.stderr  # never silently thrown away
    r = subprocess.run(_cli(*args, "--out", out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{len(kept)} of 24 shards kept" in r.stdout
    for f, ns in stamps.items():  # finished shards were verified and kept, not redone
        assert os.stat(out / f).st_mtime_ns == ns
    (v1, m1), (v2, m2) = read_embeddings(ref), read_embeddings(out)
    assert v1.tobytes() == v2.tobytes() and m1 == m2  # bit for bit
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    r = subprocess.run(_cli(*args, "--out", out, "--resume"), capture_output=True, text=True)  # once more: done
    assert r.returncode == 0 and "2400/2400 rows (complete already: nothing to redo)" in r.stdout, r.stdout


def test_ctrl_c_keeps_the_finished_shards_and_says_how_to_go_on(tiny_bundle, big_catalog, tmp_path):
    args = ["classify", tiny_bundle, "--data", big_catalog, "--shard-rows", 100, "--batch-size", 32, "--no-progress",
            "--threads", 1, "--out", tmp_path / "out"]
    # Ctrl+C as a terminal sends it, whatever this runner's own SIGINT: a suite started with `nohup ... &`
    # ignores SIGINT, and so would the child, which then ran to the end and exited 0
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = tmp_path / "out.partial" / "_manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (manifest.is_file() and json.loads(manifest.read_text())["shards"]):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Aborted" not in err, err
    assert "interrupted: the finished shards are kept; run the same command with --resume" in err
    kept = len(json.loads(manifest.read_text())["shards"])
    r = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0 and f"{kept} of 24 shards kept" in r.stdout, r.stdout + r.stderr


def test_resume_with_other_settings_is_refused(tiny_bundle, big_catalog, tmp_path):
    job = BulkJob(bundle=str(tiny_bundle), data=str(big_catalog), out=str(tmp_path / "o"), shard_rows=500,
                  progress=False, max_shards=1)
    run_bulk(job)
    job.top_k, job.max_shards, job.resume = 3, None, True
    with pytest.raises(Exception, match=r"--resume with other settings .*top_k 5 -> 3"):
        run_bulk(job)


def test_resume_with_another_bundle_or_an_edited_catalog_is_refused(tiny_bundle, big_catalog, tmp_path):
    """The shards a killed run finished were made from one model and one catalog: a resume with a retrained bundle
    at the same path, or after rows were inserted into the catalog, mixed two runs' rows in one output (the
    settings named only the paths, and each shard's sha256 says only that its files are whole)."""
    bundle, data = tmp_path / "bundle", tmp_path / "catalog.csv"
    shutil.copytree(tiny_bundle, bundle)
    shutil.copy(big_catalog, data)
    job = BulkJob(bundle=str(bundle), data=str(data), out=str(tmp_path / "o"), shard_rows=500, progress=False,
                  max_shards=1)
    run_bulk(job)
    job = replace(job, max_shards=None, resume=True)
    kept = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(json.dumps({**json.loads(kept), "created": "retrained"}))  # a new model, same path
    with pytest.raises(HuseError, match=r"--resume with another bundle .* delete .*o\.partial to start over"):
        run_bulk(job)
    (bundle / "manifest.json").write_text(kept)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:1] + lines[2:3] + lines[1:2] + lines[3:]))  # two rows swapped: same size
    with pytest.raises(HuseError, match=r"--resume with a catalog that changed .*catalog\.csv"):
        run_bulk(job)
    data.write_text("".join(lines))
    assert run_bulk(job).shards_resumed == 1


def test_bad_row_corpus_every_row_answered(tiny_bundle, tiny_catalog, tmp_path):
    img = str(next((tiny_catalog.parent / "images").glob("*.png")))
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(img).read_bytes()[:60])
    rows = [
        {"image": img, "name": "Acme black tee", "classes": "clothing<tops<t-shirts"},
        {"image": img, "name": "Acme black tee", "classes": "shoes<<boots"},
        {"image": img, "name": "\ud800"},
        {"image": img, "name": ["a", "list"]},
        {"image": 7, "name": "tee"},
        {"name": True},
        {"image": str(broken), "name": "Acme navy boots"},
        {"image": str(broken)},
        {"image": str(tmp_path / "missing.png")},
        {},
        {"image": img, "name": "x" * 1_000_000},
        {"image": img, "split": "holdout"},
    ]
    data = tmp_path / "bad.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"name": "cut\n')
    res = run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(data), out=str(tmp_path / "o"), batch_size=4,
                           progress=False))
    preds = read_predictions(tmp_path / "o")
    assert [p["row"] for p in preds] == list(range(1, 14)) and res.rows == 13
    by_row = {p["row"]: p for p in preds}
    ok = {1, 7, 11}
    for row, p in by_row.items():
        if row in ok:
            assert p["error"] is None and p["label"], p
        else:
            assert p["error"].startswith(f"row {row}"), p  # names the catalog row, never a chunk index
            assert p["label"] is None
    assert "column classes" in by_row[2]["error"] and "column name" in by_row[3]["error"]
    assert "column image" in by_row[5]["error"] and "broken.png" in by_row[7]["warning"]
    assert res.errors == 10 and res.warnings == 1


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_thread_layout_never_changes_the_output(tiny_bundle, tiny_catalog, tmp_path, task):
    """Inline (no pool) vs 1 and 3 workers preparing and finishing batches: same rows in the same order,
    including a batch whose rows all fail and a last, short batch."""
    lines = tiny_catalog.read_text().splitlines()
    data = tmp_path / "c.csv"
    bad = [f"missing-{i}.png,,," for i in range(5)]  # a whole batch of 5 with no usable image or title
    data.write_text("\n".join([lines[0]] + lines[1:31] + bad + lines[31:48]) + "\n")
    (tmp_path / "images").symlink_to(tiny_catalog.parent / "images")
    outs = []
    for workers in (0, 1, 3):
        out = tmp_path / f"o{workers}"
        run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(data), out=str(out), task=task, batch_size=5,
                         shard_rows=20, workers=workers, threads=1, progress=False))
        outs.append(read_predictions(out) if task == "classify" else read_embeddings(out))
    if task == "classify":
        assert len(outs[0]) == 52 and [p["row"] for p in outs[0]] == list(range(1, 53))
        assert sum(p["error"] is not None for p in outs[0]) == 5
        assert outs[0] == outs[1] == outs[2]
    else:
        (v0, m0), (v1, m1), (v3, m3) = outs
        assert len(m0) == 52 and np.isnan(v0).all(axis=1).sum() == 5
        assert v0.tobytes() == v1.tobytes() == v3.tobytes() and m0 == m1 == m3



@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_idle_prepare_priority_runs_the_pool_at_sched_idle_with_the_same_output(tiny_bundle, tiny_catalog, tmp_path,
                                                                                 monkeypatch):
    """--prepare-priority idle: the pool's threads prepare at SCHED_IDLE, the model's thread keeps its
    policy, and the predictions are the default's."""
    import huse.runtime.bulk as bulk

    seen = []
    real = bulk.prepare_batch

    def watched(clf, records, job):
        seen.append((threading.current_thread() is threading.main_thread(), os.sched_getscheduler(0)))
        return real(clf, records, job)

    monkeypatch.setattr(bulk, "prepare_batch", watched)
    outs = {}
    for priority in ("normal", "idle"):
        seen.clear()
        out = tmp_path / priority
        run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(out), batch_size=16, workers=1,
                         threads=1, progress=False, prepare_priority=priority))
        outs[priority] = read_predictions(out)
        policy = os.SCHED_IDLE if priority == "idle" else os.SCHED_OTHER
        assert seen and all(not main and p == policy for main, p in seen), (priority, seen)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert len(outs["idle"]) == 120 and outs["idle"] == outs["normal"]



@pytest.mark.parametrize("workers", [0, 1])
def test_a_failure_while_the_next_shard_runs_keeps_the_shard_being_written(tiny_bundle, tiny_catalog, tmp_path,
                                                                           workers):
    """Shards are written by another thread while the next one runs: when that run fails, the finished
    shard is still written and listed (resumable), and the error reaches the caller."""
    from huse.runtime.classifier import Classifier

    class FailsOnShardTwo(Classifier):
        calls = 0

        def infer(self, *a, **k):
            FailsOnShardTwo.calls += 1
            if FailsOnShardTwo.calls == 6:  # shard 1's second batch (4 batches of 5 per shard)
                raise RuntimeError("model failed")
            return super().infer(*a, **k)

    out = tmp_path / "o"
    job = dict(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(out), batch_size=5, shard_rows=20,
               workers=workers, threads=1, progress=False)
    with pytest.raises(RuntimeError, match="model failed"):
        run_bulk(BulkJob(**job, classifier=lambda: FailsOnShardTwo(str(tiny_bundle), threads=1)))
    kept = json.loads((tmp_path / "o.partial" / "_manifest.json").read_text())["shards"]
    assert [e["shard"] for e in kept.values()] == [0] and (tmp_path / "o.partial" / "part-00000.parquet").is_file()
    r = run_bulk(BulkJob(**job, resume=True))
    run_bulk(BulkJob(**dict(job, out=str(tmp_path / "ref"))))
    assert r.shards_resumed == 1 and r.rows == 120 and read_predictions(out) == read_predictions(tmp_path / "ref")

def test_unknown_prepare_priority_is_refused(tiny_bundle, tiny_catalog, tmp_path):
    r = subprocess.run(_cli("classify", tiny_bundle, "--data", tiny_catalog, "--out", tmp_path / "o",
                            "--prepare-priority", "high"), capture_output=True, text=True)
    assert r.returncode == 2 and "high" in r.stderr
    with pytest.raises(HuseError, match="prepare-priority 'high' is not one of"):
        run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / "o"),
                         prepare_priority="high"))

def test_parquet_output_without_pyarrow_is_refused_before_any_row_runs(tiny_bundle, tiny_catalog, tmp_path,
                                                                         monkeypatch):
    import huse.runtime.bulk as bulk

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what a lean install (`huse-edge[ort]`) has
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    run_local, classified = bulk._run_local, []
    monkeypatch.setattr(bulk, "_run_local", lambda *a: classified.append(a))
    with pytest.raises(HuseError, match=r"huse-edge\[scale\].*--format jsonl"):
        run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / "o"), progress=False))
    assert not classified and not list(tmp_path.iterdir())
    monkeypatch.setattr(bulk, "_run_local", run_local)
    r = run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / "o.jsonl"), progress=False))
    assert r.rows == 120 and (tmp_path / "o.jsonl").is_file()  # the lean way works without pyarrow


def test_bulk_never_imports_torch(tiny_bundle, tiny_catalog, tmp_path):
    code = f"""
import sys
from huse.runtime.bulk import BulkJob, run_bulk
r = run_bulk(BulkJob(bundle={str(tiny_bundle)!r}, data={str(tiny_catalog)!r}, out={str(tmp_path / 'o')!r}, progress=False))
assert r.rows == 120, r
print(sorted(m for m in ("torch", "onnx", "huse.train", "huse.export", "ray") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the whole session: starting one costs seconds."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("task, mode", [("classify", "auto"), ("embed", "auto"), ("embed", "index")])
def test_ray_engine_matches_local_exactly(ray_instance, tiny_bundle, big_catalog, tmp_path, task, mode):
    common = dict(bundle=str(tiny_bundle), data=str(big_catalog), task=task, mode=mode, shard_rows=600, batch_size=64,
                  progress=False, threads=1)
    local = run_bulk(BulkJob(out=str(tmp_path / "local"), **common))
    ray = run_bulk(BulkJob(out=str(tmp_path / "ray"), engine="ray", actors=2, **common))
    assert ray.rows == local.rows == 2400 and ray.errors == local.errors == 0
    if mode == "index":  # the vectors of an index, for `huse index build --embeddings`
        for (m1, v1), (m2, v2) in zip(iter_embeddings(tmp_path / "local"), iter_embeddings(tmp_path / "ray")):
            assert sorted(v1) == sorted(v2) == ["image", "text", "visual"] and m1 == m2
            assert all(v1[k].tobytes() == v2[k].tobytes() for k in v1)
    elif task == "embed":
        (v1, m1), (v2, m2) = read_embeddings(tmp_path / "local"), read_embeddings(tmp_path / "ray")
        assert v1.tobytes() == v2.tobytes() and m1 == m2
    else:
        assert read_predictions(tmp_path / "local") == read_predictions(tmp_path / "ray")
    ml, mr = (json.loads((tmp_path / d / "_manifest.json").read_text()) for d in ("local", "ray"))
    assert [e["files"] for e in ml["shards"].values()] == [mr["shards"][k]["files"] for k in ml["shards"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine, address, message", [
    ("local", "auto", "only --engine ray uses"),
    ("ray", "ray://127.0.0.1:10001", "does not run over Ray Client"),
    ("ray", "127.0.0.1", "is not HOST:PORT"),
    ("ray", "127.0.0.1:{free}", "no Ray cluster answers"),
])
def test_a_ray_address_that_cannot_work_is_refused_at_once(tiny_bundle, tiny_catalog, tmp_path, engine, address,
                                                            message):
    if engine == "ray":
        pytest.importorskip("ray.data")
    job = BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / "out"), engine=engine,
                  address=address.format(free=_free_port()), progress=False)
    t0 = time.perf_counter()
    with pytest.raises(HuseError, match=message):
        run_bulk(job)
    assert time.perf_counter() - t0 < 30  # ray.init alone retries an address where nothing listens for minutes
    assert not list(tmp_path.iterdir())  # nothing written


def test_ray_engine_joins_a_running_cluster_and_starts_its_own_beside_one(tiny_bundle, tiny_catalog, tmp_path):
    """`ray start --head` on loopback, then the CLI twice: joining it by --address, and without --address but
    with RAY_ADDRESS naming it (a local instance of its own, as documented, where ray.init alone would join
    the cluster and refuse num_cpus). Both outputs equal the local engine's."""
    pytest.importorskip("ray.data")
    port, ray_cli = _free_port(), Path(sys.executable).parent / "ray"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # loopback only; a real cluster keeps its token
    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
                             "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--temp-dir", temp],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(300):  # the GCS port open
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        common = ["--data", tiny_catalog, "--no-progress", "--shard-rows", 60, "--actors", 1, "--engine", "ray"]
        run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / "local"),
                         shard_rows=60, progress=False))
        for name, extra, more_env in (("joined", ["--address", f"127.0.0.1:{port}"], {}),
                                      ("own", [], {"RAY_ADDRESS": f"127.0.0.1:{port}"})):
            r = subprocess.run(_cli("classify", tiny_bundle, "--out", tmp_path / name, *common, *extra),
                               env=dict(env, **more_env), capture_output=True, text=True, timeout=240)
            assert r.returncode == 0, r.stderr[-2000:]
            assert read_predictions(tmp_path / name) == read_predictions(tmp_path / "local")
    finally:
        os.killpg(head.pid, signal.SIGINT)  # --block: the head stops what it started (SIGTERM: after ~30 s)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:  # its shutdown, slow on a loaded machine, is not what this test checks
            os.killpg(head.pid, signal.SIGKILL)  # its group: the daemons it started (never `ray stop`, which also
            head.wait(timeout=30)                # ends the Ray this test process runs as a driver, and pytest with it)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_parquet_catalog_holding_its_photos_classifies_and_embeds_as_one_with_paths(tiny_bundle, tiny_catalog,
                                                                                    tmp_path):
    pytest.importorskip("pyarrow.parquet")
    from tests.models.make_data import photos_in_parquet

    held = photos_in_parquet(tiny_catalog, tmp_path / "held.parquet")
    for task, read in (("classify", read_predictions), ("embed", read_embeddings)):
        common = dict(bundle=str(tiny_bundle), task=task, shard_rows=50, progress=False, threads=1)
        run_bulk(BulkJob(data=str(tiny_catalog), out=str(tmp_path / f"{task}-paths"), **common))
        r = run_bulk(BulkJob(data=str(held), out=str(tmp_path / f"{task}-held"), **common))
        assert r.rows == 120 and r.errors == 0
        paths, photos = read(tmp_path / f"{task}-paths"), read(tmp_path / f"{task}-held")
        if task == "embed":
            assert paths[0].tobytes() == photos[0].tobytes()
            paths, photos = paths[1], photos[1]
        assert all(row["image"] is None for row in photos)  # the bytes are not copied into the output
        assert [dict(row, image=None) for row in paths] == photos


@pytest.mark.parametrize("out", ["out", "preds.jsonl"])
def test_a_second_run_on_the_same_output_is_refused_while_the_first_works(tiny_bundle, tiny_catalog, tmp_path, out):
    """Another process holds the output's lock (as a running `huse classify` does): refused at once, even with
    --resume (which would have cleaned the first run's files from under it); once that process is gone
    (killed: the kernel drops its lock), the run goes ahead and leaves no lock file."""
    target = tmp_path / out
    lock = target.with_name(f".{target.name}{'.shards' if out.endswith('.jsonl') else ''}.lock")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, sys, time
f = open({str(lock)!r}, "a"); fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        job = BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(target), progress=False)
        for resume in (False, True):
            with pytest.raises(HuseError, match=f"--out {target} is being written by another huse run right now"):
                run_bulk(replace(job, resume=resume))
    finally:
        holder.kill()
        holder.wait()
    assert run_bulk(job).rows == 120 and not lock.exists()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_outputs_are_read_a_shard_at_a_time(tiny_bundle, tiny_catalog, tmp_path, fmt):
    """`--show N` and the review queue read a classify output as a stream: the first rows come without
    reading the later shards (read_predictions of a 10M-row output held every row in memory)."""
    import itertools

    from huse.runtime.bulk import iter_predictions

    out = tmp_path / "out"
    run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(out), shard_rows=50, format=fmt,
                     progress=False))
    want = read_predictions(out)
    for shard in sorted(out.glob(f"part-*.{fmt}"))[1:]:
        shard.write_bytes(b"not this")  # never read for the first rows
    assert list(itertools.islice(iter_predictions(out), 30)) == want[:30]
    with pytest.raises(Exception):
        list(iter_predictions(out))


def test_a_catalog_that_cannot_be_read_leaves_nothing_to_resume(tiny_bundle, tmp_path):
    """The first read of the catalog (counting its rows) failed after OUT.partial was made; the corrected
    rerun was then told that an interrupted run waited for --resume."""
    (tmp_path / "catalog.xlsx").write_bytes(b"PK\x03\x04")
    job = BulkJob(bundle=str(tiny_bundle), data=str(tmp_path / "catalog.xlsx"), out=str(tmp_path / "out"),
                  progress=False)
    with pytest.raises(HuseError, match="is a spreadsheet workbook"):
        run_bulk(job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.xlsx"]


@pytest.mark.parametrize("mode", ["auto", "image", "text"])
def test_embed_a_row_without_a_photo(tiny_bundle, tiny_catalog, tmp_path, mode):
    """A product without a photo got a NaN vector labelled modality 'image', and no error: auto now embeds its
    title, --mode image makes it the row's error, and no finite-looking row is ever NaN."""
    from huse.runtime import Classifier

    rows = [dict(r, image=str(tiny_catalog.parent / r["image"])) for r in csv.DictReader(open(tiny_catalog))][:4]
    rows[1]["image"] = ""
    catalog = tmp_path / "some-without-photos.csv"
    write_rows(catalog, rows)
    r = run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(catalog), out=str(tmp_path / "e"), task="embed", mode=mode,
                         progress=False))
    vectors, meta = read_embeddings(tmp_path / "e")
    with Classifier(tiny_bundle) as clf:
        title = clf.embed_text([rows[1]["name"]]).vectors[0]
    if mode == "image":
        assert r.errors == 1 and meta[1]["error"] == "row 2: no image" and meta[1]["modality"] is None
        assert np.isnan(vectors[1]).all()
    else:
        assert r.errors == 0 and meta[1]["modality"] == "text" and meta[1]["error"] is None
        np.testing.assert_allclose(vectors[1], title, atol=1e-6)
    for v, m in zip(vectors, meta):  # a vector is finite exactly when its row has no error
        assert np.isfinite(v).all() == (m["error"] is None)


def test_a_local_run_collects_young_objects_less_often_and_restores_the_callers_setting(tiny_bundle, tiny_catalog,
                                                                                          tmp_path):
    """A batch's results die by reference counting; the default thresholds scanned the shard being filled
    again and again (runtime/_collector.py). The setting is the whole process's: the caller's comes back."""
    import gc

    from huse.runtime._collector import THRESHOLDS
    from huse.runtime.classifier import Classifier

    seen = []

    class Records(Classifier):
        def infer(self, *a, **k):
            seen.append(gc.get_threshold())
            return super().infer(*a, **k)

    before = gc.get_threshold()
    gc.set_threshold(600, 9, 8)
    try:
        run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / "o"), batch_size=50,
                         threads=1, progress=False, classifier=lambda: Records(str(tiny_bundle), threads=1)))
        after = gc.get_threshold()
    finally:
        gc.set_threshold(*before)
    assert seen and set(seen) == {THRESHOLDS}
    assert after == (600, 9, 8)
