"""The GPU benchmark run's CPU smoke: the same command, parts and files, tiny shapes (no GPU needed)."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_SRC = os.environ.get("FASTDELTA_GPU_ANCHOR", "")  # the public-recipe anchor script, where one is at hand


def test_session_smoke_runs_every_part_and_writes_rows(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path)}
    if os.path.isfile(ANCHOR_SRC):
        subprocess.run(["bash", "benchmarks/gpu/session.sh", "prepare", ANCHOR_SRC], cwd=ROOT, check=True, env=env)
    r = subprocess.run(["bash", "benchmarks/gpu/session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert "== preflight: exit 0" in r.stdout, r.stdout[-3000:]
    for part in ("step", "distance", "attention"):
        assert f"== {part}: exit 0" in r.stdout, r.stdout[-3000:]
    assert (tmp_path / "machine.txt").read_text().strip()
    rows = json.loads((tmp_path / "bench_step_gpu" / "bench_step.json").read_text())["rows"]
    assert {(x["method"], x["engine"]) for x in rows} == {(m, e) for m in ("delta", "l2", "l2_sp")
                                                          for e in ("public", "fastdelta")}
    for name in ("distance_gpu", "attention_gpu"):
        assert json.loads((tmp_path / f"{name}.json").read_text())
        assert [json.loads(line) for line in (tmp_path / f"{name}.rows.jsonl").read_text().splitlines()]


def test_prepare_names_the_missing_anchor():
    r = subprocess.run(["bash", "benchmarks/gpu/session.sh", "prepare", "no/such/anchor.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no/such/anchor.py" in r.stdout
