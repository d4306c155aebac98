"""The repository stays small: a GPU run receives at most 64 MiB of working tree (tracked files and the
untracked ones git does not ignore), and committed results are summaries, figures and commands
(benchmarks/slim_results.py slims a results folder before it is committed)."""
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREE_LIMIT = 15 * 10**6   # bytes, the whole tree
FILE_LIMIT = 2 * 10**6    # bytes, any one file


def tree_files() -> dict:
    """{path: size} of what a commit of this checkout would hold: the tracked files that exist and the
    untracked ones git does not ignore (what the GPU run carries too)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sizes = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and not path.is_symlink():
            sizes[name] = path.stat().st_size
    return sizes


def where(sizes: dict, n: int = 8) -> str:
    """The largest folders (three levels deep) and files, for the failure message."""
    folders = Counter()
    for name, size in sizes.items():
        folders[os.path.join(".", *Path(name).parts[:-1][:3])] += size
    big = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
    return ("largest folders: " + ", ".join(f"{f} {s / 1e6:.1f} MB" for f, s in folders.most_common(n))
            + "; largest files: " + ", ".join(f"{f} {s / 1e6:.2f} MB" for f, s in big)
            + " (slim new results: python3 benchmarks/slim_results.py FOLDER)")


def test_tree_under_15_mb():
    sizes = tree_files()
    total = sum(sizes.values())
    assert total <= TREE_LIMIT, f"the tree holds {total / 1e6:.1f} MB (limit {TREE_LIMIT / 1e6:.0f} MB); " + where(sizes)


def test_no_file_over_2_mb():
    sizes = tree_files()
    big = {name: size for name, size in sizes.items() if size > FILE_LIMIT}
    assert not big, f"files over {FILE_LIMIT / 1e6:.0f} MB: " + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in big.items())


def test_committed_results_are_slim():
    """What benchmarks/slim_results.py removes is not committed again: per-run history.png and full
    history.jsonl under a comparison's runs/, and uncompressed report.json in committed results."""
    sizes = tree_files()
    results = [n for n in sizes if n.startswith("benchmarks/results/")]
    bulky = [n for n in results if "/runs/" in n and Path(n).name in ("history.png", "history.jsonl")]
    bulky += [n for n in results if Path(n).name == "report.json"]
    assert not bulky, (f"{len(bulky)} files that benchmarks/slim_results.py slims, e.g. {bulky[:3]}: run "
                       "python3 benchmarks/slim_results.py on their folder")
