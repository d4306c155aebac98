"""The README is a user's guide whose examples run: every fenced ```python and ```bash block in README.md
is run as written, each in a fresh folder holding the tiny data the examples name (DATA/train/<class>/,
DATA/test/<class>/, images/), except the set-up commands (CI runs them: .ci/run) and the blocks marked
`<!-- not run: REASON -->` on the line before them. And every relative link of README.md and docs/*.md
leads to a file that exists (and to a heading that exists, where it names one)."""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = ["bash scripts/setup.sh && fastdelta demo", "bash scripts/setup.sh && python3 -m pytest -q tests"]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
CLASSES = ("cat", "dog")
BLOCK_TIMEOUT_S = 300


# -- the README's code blocks ----------------------------------------------------------------------------------

def code_blocks(text: str) -> list:
    """[(language, code, line number, the `not run` reason or None)] of every fenced block, in order."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(m.group(1)):])
            i += 1
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        reason = NOT_RUN.search(before)
        blocks.append((m.group(2), "\n".join(body) + "\n", start + 1, reason.group(1) if reason else None))
        i += 1
    return blocks


def runnable_blocks() -> list:
    """pytest params of the blocks this test runs: python and bash, not the set-up, not marked."""
    params = []
    for n, (lang, code, line, reason) in enumerate(code_blocks(README.read_text())):
        if lang not in ("python", "bash") or reason or code.strip().split("\n") == SETUP:
            continue
        params.append(pytest.param(lang, code, id=f"README.md:{line}:{lang}"))
    return params


def make_readme_data(root: Path, size: int = 16) -> None:
    """The tiny data the README's examples name: DATA/train/<class>/ (6 JPEGs per class), DATA/test/<class>/
    (3), images/ (3 unlabelled), 16x16, every image different (fit refuses test images equal to training
    ones); the classes differ in brightness, so that there is something to learn."""
    rng = np.random.default_rng(0)

    def image(path: Path, level: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(level, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=95)

    for split, n in (("train", 6), ("test", 3)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                image(root / "DATA" / split / name / f"{name}_{i}.jpg", 70 + 110 * c)
    for i in range(3):
        image(root / "images" / f"photo_{i}.jpg", rng.uniform(60, 190))


@pytest.fixture(scope="module")
def block_env(tmp_path_factory) -> dict:
    """The environment the blocks run in: one thread per process (a shared machine), one fastdelta cache for
    all the blocks (the attention and step-engine caches; the compiled native kernel stays where conftest
    puts it), and `fastdelta` on PATH even where the package's script is not installed."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg",
           "FASTDELTA_CACHE": str(tmp_path_factory.mktemp("readme-cache")),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if shutil.which("fastdelta") is None:
        bin_dir = tmp_path_factory.mktemp("bin")
        script = bin_dir / "fastdelta"
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fastdelta "$@"\n')
        script.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_block(lang: str, code: str, folder: Path, env: dict):
    """Run one block as written in `folder` (made holding the tiny data): (exit status, stdout, stderr), or
    None when it ran over BLOCK_TIMEOUT_S."""
    make_readme_data(folder)
    if lang == "python":
        (folder / "block.py").write_text(code)
        cmd = [sys.executable, "block.py"]
    else:
        cmd = ["bash", "-e", "-u", "-o", "pipefail", "-c", code]
    try:
        done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def block_runs(request, block_env, tmp_path_factory) -> dict:
    """The selected blocks, started at once, two at a time (each process has one thread): {code: future}."""
    selected = [item.callspec.params for item in request.session.items
                if getattr(item, "originalname", None) == "test_readme_block_runs_as_written"]
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    # the longest first (roughly: the most processes started), so that the two lanes end together
    for params in sorted(selected, key=lambda p: -len(re.findall(r"^fastdelta ", p["code"], re.M))):
        folder = tmp_path_factory.mktemp("block")
        futures[params["code"]] = pool.submit(run_block, params["lang"], params["code"], folder, block_env)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("lang, code", runnable_blocks())
def test_readme_block_runs_as_written(lang, code, block_runs):
    result = block_runs[code].result()
    assert result is not None, f"the block ran over {BLOCK_TIMEOUT_S} s:\n{code}"
    status, stdout, stderr = result
    assert status == 0, f"exit status {status} of\n{code}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"


def test_the_blocks_are_found():
    """The parser sees the blocks this test is about: the set-up first, then the quick start's two, the
    own-loop program, and the torchrun block marked not run."""
    blocks = code_blocks(README.read_text())
    assert blocks[0][1].strip().split("\n") == SETUP
    runnable = runnable_blocks()
    assert len(runnable) >= 4 and {p.values[0] for p in runnable} == {"python", "bash"}
    assert any("FeatureMapRegularizer" in p.values[1] for p in runnable)
    assert any(reason and "torchrun" in code for _, code, _, reason in blocks)
    assert all("torchrun" not in p.values[1] for p in runnable)


def test_the_setup_commands_open_the_readme_and_ci_runs_the_test_command():
    text = README.read_text()
    first = code_blocks(text)[0]
    assert first[0] == "bash" and first[1].strip().split("\n") == SETUP
    assert text.index(SETUP[0]) < text.index("## ")   # before any section
    ci = (ROOT / ".ci" / "run").read_text()
    assert SETUP[1] in ci


def test_readme_is_a_short_guide():
    assert len(README.read_text().split("\n")) <= 320


# -- links -------------------------------------------------------------------------------------------------------

def markdown_files() -> list:
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked (their brackets are not links)."""
    text = re.sub(r"^\s*```.*?^\s*```\s*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text: str) -> list:
    """The targets of the inline links [text](target) outside code."""
    return re.findall(r"\]\(([^()\s]+)\)", without_code(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    text = re.sub(r"^\s*```.*?^\s*```\s*$", "", path.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def test_slug_is_githubs():
    assert slug("More than one GPU or machine: torch.distributed") == "more-than-one-gpu-or-machine-torchdistributed"
    assert slug("Does DELTA help on my data? `fastdelta compare`") == "does-delta-help-on-my-data-fastdelta-compare"


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_the_link_check_sees_links():
    readme_links = links(README.read_text())
    assert "docs/results.md" in readme_links and "docs/gpu.md" in readme_links and "SECURITY.md" in readme_links
    results = links((ROOT / "docs" / "results.md").read_text())
    assert sum(t.startswith("../benchmarks/results/") for t in results) >= 10


# -- the README's summary of the results quotes docs/results.md ------------------------------------------------

def test_the_results_summary_quotes_docs_results():
    """Each quoted sentence of the README's Results section is docs/results.md's own words."""
    text = README.read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    quotes = re.findall(r'"([^"]+)"', section)
    results = " ".join((ROOT / "docs" / "results.md").read_text().split())
    assert len(quotes) >= 5
    missing = [q for q in quotes if " ".join(q.split()) not in results]
    assert not missing, f"README quotes not in docs/results.md: {missing}"
