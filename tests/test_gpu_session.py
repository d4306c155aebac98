"""The GPU benchmark run's CPU smoke: the same command, parts, files and summary, tiny shapes (no GPU needed)."""
import json
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_SRC = os.environ.get("FASTDELTA_GPU_ANCHOR", "")  # the public-recipe anchor script, where one is at hand
# what comes back from the device machine: at most 8 files of $OUT
HEADLINE = {"all.tar.gz", "machine.txt", "summary.txt", "bench_step.json", "bench_step.md", "anchor.json"}


def session(tmp_path, **env):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), **env}
    return subprocess.run(["bash", "benchmarks/gpu/session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def archive(out: Path) -> dict:
    with tarfile.open(out / "all.tar.gz") as tar:
        return {os.path.normpath(m.name): tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_session_smoke_runs_every_part_and_writes_rows(tmp_path):
    if os.path.isfile(ANCHOR_SRC):
        subprocess.run(["bash", "benchmarks/gpu/session.sh", "prepare", ANCHOR_SRC], cwd=ROOT, check=True,
                       env={**os.environ, "SMOKE": "1"})
    r = session(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for part in ("step/delta", "step/l2,l2_sp", "step/anchor", "preflight", "distance", "attention"):
        assert f"== {part}: exit 0" in r.stdout, r.stdout[-3000:]
    # step first (DELTA alone, then L2 and L2-SP), then preflight, distance, attention
    order = [r.stdout.index(f"== {p}: exit") for p in ("step/delta", "step/l2,l2_sp", "preflight", "distance",
                                                        "attention")]
    assert order == sorted(order)

    # what comes back: at most 8 files, the archive and the headline files
    files = {p.name for p in tmp_path.iterdir()}
    assert len(files) <= 8 and files == HEADLINE, files
    assert (tmp_path / "machine.txt").read_text().strip()
    held = archive(tmp_path)
    for name in ("machine.txt", "status.tsv", "summary.txt", "step.log", "preflight.log", "distance.log",
                 "attention.log", "bench_step_gpu/bench_step.json", "bench_step_gpu/bench_step.md", "anchor.json",
                 "distance_gpu.json", "distance_gpu.rows.jsonl", "attention_gpu.json", "attention_gpu.rows.jsonl"):
        assert name in held, (name, sorted(held))
    assert any(n.startswith("bench_step_gpu/profile_smoke_delta") for n in held)  # the DELTA rows' profiles
    for name in ("distance_gpu", "attention_gpu"):
        assert json.loads(held[f"{name}.json"])
        assert [json.loads(line) for line in held[f"{name}.rows.jsonl"].splitlines()]

    # the step rows: both engines, every method, finite, the method's default hyperparameters
    step = json.loads((tmp_path / "bench_step.json").read_text())
    assert step == json.loads(held["bench_step_gpu/bench_step.json"])
    rows = step["rows"]
    assert {(x["method"], x["engine"]) for x in rows} == {(m, e) for m in ("delta", "l2", "l2_sp")
                                                          for e in ("public", "fastdelta")}
    assert all("error" not in x and x["finite"] is True for x in rows), rows
    assert {x["method"]: x["alpha"] for x in rows} == {"delta": 1e-4, "l2": None, "l2_sp": 0.01}  # L2: no alpha
    assert all(x["bn_calibration"]["batches"] > 0 for x in rows)
    assert json.loads((tmp_path / "anchor.json").read_text())  # the anchor's rows, or why there are none

    # stdout ends with the summary: per method and engine, then every part's exit status
    summary = (tmp_path / "summary.txt").read_text()
    assert summary == held["summary.txt"] and r.stdout.endswith(summary)
    tail = r.stdout[r.stdout.rindex("== summary"):].rstrip("\n").splitlines()
    assert tail[-1].startswith("| attention | 0 |"), tail[-3:]
    assert "| model | method | engine | img/s | ms/step | vs public | first step s | peak GiB |" in tail
    for method in ("delta", "l2", "l2_sp"):
        for engine in ("anchor fp32", "public", "fastdelta"):
            assert any(line.startswith(f"| smoke | {method} | {engine} |") for line in tail), (method, engine)
    assert any(line.startswith("| step/delta | 0 |") for line in tail)


def test_a_failing_part_does_not_stop_the_others_and_a_late_part_is_skipped(tmp_path):
    """An unknown part fails (exit 2), the next still runs; a part without time left before TOTAL is skipped;
    the files and the summary are there either way."""
    r = session(tmp_path, PARTS="nosuchpart distance", TOTAL="20")
    assert r.returncode != 0
    assert "unknown part nosuchpart" in r.stdout
    tail = r.stdout[r.stdout.rindex("== summary"):].rstrip("\n").splitlines()
    assert tail[-2:] == ["| nosuchpart | 2 | 0 | 0 |", "| distance | skipped | 0 | 120 |"], tail
    assert {p.name for p in tmp_path.iterdir()} == HEADLINE
    assert "no step rows" in json.loads((tmp_path / "bench_step.json").read_text())["missing"]


def test_prepare_names_the_missing_anchor():
    r = subprocess.run(["bash", "benchmarks/gpu/session.sh", "prepare", "no/such/anchor.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no/such/anchor.py" in r.stdout
