"""A compare run again with reuse takes every finished run back, search and final alike: no refit, the same report."""
import dataclasses, json, sys
sys.path.insert(0, "tests")
from fastdelta.compare.comparison import compare
from test_compare import QUICK, SETTINGS
from tiny import arrays, tiny_net

def run(out, reuse):
    cs = dataclasses.replace(SETTINGS, reuse_search=reuse)
    return compare(tiny_net(), arrays(n_per_class=5), arrays(seed=1), methods=["l2_sp", "delta"], seeds=2,
                   out=out, compare_settings=cs, **QUICK)

def strip(r):
    r = json.loads(json.dumps(r, default=str))
    for k in ("wall_s", "environment", "figures"): r.pop(k, None)
    r["compare"].pop("reuse_search"); r["attention"].pop("seconds")
    for x in r["runs"]: x.pop("seconds")
    for x in r["search"]["results"]: x.pop("seconds"); x.pop("reused")
    return r

def test_finished_finals_are_reused_with_the_same_report(tmp_path):
    a = run(tmp_path, False)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/result.json")}
    b = run(tmp_path, True)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a finished final was refitted"
    assert strip(a) == strip(b)
