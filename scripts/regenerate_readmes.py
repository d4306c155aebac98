"""Rewrite every script-written README.md under a results folder from the files beside it, with the command
its own "Command:" line names; then `git diff benchmarks/results` shows whether the committed READMEs are
what today's readers make of today's files (after benchmarks/slim_results.py, nothing may change).

    python3 scripts/regenerate_readmes.py [ROOT ...]      default: benchmarks/results
    python3 scripts/regenerate_readmes.py --check [ROOT]  the same into a copy: exit 1 and a diff where a README differs

Which README is which (each script writes a recognisable first line):
- "# Reproduction: ImageNet EfficientNet-Lite0 -> ..." with per_class_N/ reports beside it:
  `benchmarks/reproduce_fashion_mnist.py --out DIR --summary-only --command CMD`
- "# Reproduction: related source ..." (a recipe folder under a folder with source/source.json):
  `benchmarks/reproduce_related_source.py target --out PARENT --name DIR --summary-only --command CMD`
- "# Related source -> disjoint target": `benchmarks/reproduce_related_source.py overview --out DIR --command CMD`
The other READMEs (tap_forms, alpha_range) are hand-written around their scripts' own summaries
(tap_forms.md, alpha_range.md: `--summary-only` of benchmarks/tap_forms.py and alpha_range.py).
What a person adds to a script-written README goes in NOTES.md beside it: the scripts put it after the
preamble, so it survives this rewrite.
"""
import argparse
import difflib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

SIZES = "10,30,100"


def command_of(text: str) -> str:
    m = re.search(r"^Command: `(.*)`$", text, re.M)
    if not m:
        raise ValueError("no 'Command: `...`' line")
    return m.group(1)


def regenerate(readme: Path) -> str:
    """Rewrite `readme` with the script that wrote it; returns what it was ('skipped: ...' when none)."""
    import reproduce_fashion_mnist
    import reproduce_related_source
    text = readme.read_text()
    first = text.split("\n", 1)[0]
    folder = readme.parent
    if first.startswith("# Related source -> disjoint target"):
        reproduce_related_source.main(["overview", "--out", str(folder), "--command", command_of(text)])
        return "overview"
    if first.startswith("# Reproduction: related source"):
        reproduce_related_source.main(["target", "--out", str(folder.parent), "--name", folder.name, "--sizes", SIZES,
                                       "--summary-only", "--command", command_of(text)])
        return "related target summary"
    if first.startswith("# Reproduction:"):
        reproduce_fashion_mnist.main(["--out", str(folder), "--sizes", SIZES, "--summary-only",
                                      "--command", command_of(text)])
        return "reproduction summary"
    return "skipped: not written by a summary script"


def readmes(root: Path):
    return sorted(root.rglob("README.md"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", default=[str(ROOT / "benchmarks" / "results")])
    p.add_argument("--check", action="store_true", help="regenerate in a copy and show the differences")
    a = p.parse_args(argv)
    changed = 0
    for root in map(Path, a.roots):
        if not a.check:
            for readme in readmes(root):
                print(f"{readme}: {regenerate(readme)}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / root.name
            shutil.copytree(root, copy, ignore=shutil.ignore_patterns("*.png", "history*", "model.pt"))
            for readme in readmes(copy):
                what = regenerate(readme)
                old = (root / readme.relative_to(copy)).read_text()
                new = readme.read_text()
                same = old == new
                changed += not same
                print(f"{root / readme.relative_to(copy)}: {what}: {'identical' if same else 'DIFFERS'}")
                if not same:
                    sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                               "committed", "regenerated", n=1))
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
