"""The native CPU kernel is built by the top-level CMakeLists.txt: on its first use into a cache keyed by
torch version, Python ABI and a digest of CMakeLists.txt and the source (fastdelta/kernels/native.py), in
every install mode, and by hand in any folder.

Scenarios that load a library run in fresh processes (one process can load one fastdelta_native
library); all use a FASTDELTA_CACHE under tmp_path. The first-use build (15-40 s on a loaded 2-core
machine) is shared: two processes start on an empty cache at once, and the editable-install test
reuses what they built. The by-hand CMake build in a fresh folder is the second.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdelta.kernels import native


@pytest.fixture(autouse=True)
def _cache_from_fastdelta_cache(monkeypatch):
    """These scenarios build into FASTDELTA_CACHE/native under tmp_path, not the suite's shared build."""
    monkeypatch.delenv("FASTDELTA_NATIVE_CACHE", raising=False)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILING = "fastdelta: compiling the native CPU kernel"

# The CPU distance with impl="auto", checked against float64; prints which implementation ran.
USE = textwrap.dedent("""
    import json, warnings, torch
    warnings.simplefilter("always")
    from fastdelta.kernels import dispatch, native, reference_distance
    g = torch.Generator().manual_seed(0)
    t, s, w = torch.randn(3, 5, 7, 11, generator=g), torch.randn(3, 5, 7, 11, generator=g), torch.rand(5, generator=g)
    got = dispatch.fm_distance(t, s, w)
    want = reference_distance(t.double(), s.double(), w.double())
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()), (got.item(), want.item())
    print("RESULT " + json.dumps({"impl": dispatch.resolve("auto", t), "module": native.__file__, **native.status()}))
""")


def start(cache, python=sys.executable, cwd=ROOT):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTDELTA_NATIVE_LIB", "FASTDELTA_NATIVE", "CXX", "FASTDELTA_NATIVE_CACHE")}
    return subprocess.Popen([str(python), "-c", USE], cwd=str(cwd), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**env, "FASTDELTA_CACHE": str(cache)})


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.split("RESULT ", 1)[1]), err


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    """Two processes use the kernel at once on an empty cache (as DDP ranks would)."""
    cache = tmp_path_factory.mktemp("native_cache")
    procs = [start(cache) for _ in range(2)]
    return cache, [finish(p) for p in procs]


def test_first_use_compiles_once_and_later_processes_load(first_build):
    cache, runs = first_build
    for res, err in runs:
        assert res["impl"] == "native" and res["available"], (res, err)
        assert res["path"].startswith(str(cache / "native" / native.current_key())), res
    assert sum(COMPILING in err for _, err in runs) == 1, [err for _, err in runs]  # the other one waited
    key_dir = cache / "native" / native.current_key()
    assert [p.name for p in (cache / "native").iterdir()] == [key_dir.name]
    assert not [p for p in key_dir.iterdir() if ".tmp" in p.name]  # only complete files under final names
    assert json.loads((key_dir / "build.json").read_text())["torch"] == torch.__version__
    res, err = finish(start(cache))
    assert res["impl"] == "native" and COMPILING not in err and "waiting" not in err, err


def test_cache_key_changes_with_torch_python_and_source(monkeypatch, tmp_path):
    flags = native.cmake_options()
    digest = native.source_digest(b"int x;", flags)
    key = native.cache_key("2.14.1+cu130", "cpython-311-x86_64-linux-gnu", digest)
    assert key == native.cache_key("2.14.1+cu130", "cpython-311-x86_64-linux-gnu", digest)
    others = [native.cache_key("2.15.0+cu130", "cpython-311-x86_64-linux-gnu", digest),
              native.cache_key("2.14.1+cu130", "cpython-312-x86_64-linux-gnu", digest),
              native.cache_key("2.14.1+cu130", "cpython-311-x86_64-linux-gnu", native.source_digest(b"int y;", flags)),
              native.cache_key("2.14.1+cu130", "cpython-311-x86_64-linux-gnu",
                               native.source_digest(b"int x;", flags + ["-DFASTDELTA_MARCH=native"]))]
    assert len({key, *others}) == 5
    # the key of this process follows torch.__version__ and the source file
    here = native.current_key()
    assert torch.__version__ in here and native.python_tag() in here
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert native.current_key() != here
    monkeypatch.undo()
    changed = tmp_path / "fm_distance.cpp"
    changed.write_bytes(open(native.SOURCE, "rb").read() + b"\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", str(changed))
    assert native.current_key() != here
    monkeypatch.undo()
    changed = tmp_path / "CMakeLists.txt"  # the build definition is part of the key too
    changed.write_bytes(open(native.CMAKE_LISTS, "rb").read() + b"\n# changed\n")
    monkeypatch.setattr(native, "CMAKE_LISTS", str(changed))
    assert native.current_key() != here
    monkeypatch.undo()
    monkeypatch.setenv("FASTDELTA_MARCH", "native")
    assert native.current_key() != here


def test_prebuilt_library_is_found_before_the_cache(monkeypatch, tmp_path):
    key = native.current_key()
    for root in ("prebuilt", "cache/native"):
        (tmp_path / root / key).mkdir(parents=True)
        (tmp_path / root / key / native.LIB_NAME).write_bytes(b"")
    monkeypatch.setattr(native, "PREBUILT_ROOT", str(tmp_path / "prebuilt"))
    monkeypatch.setenv("FASTDELTA_CACHE", str(tmp_path / "cache"))
    assert native._find(key) == str(tmp_path / "prebuilt" / key / native.LIB_NAME)
    monkeypatch.setattr(native, "PREBUILT_ROOT", str(tmp_path / "absent"))
    assert native._find(key) == str(tmp_path / "cache" / "native" / key / native.LIB_NAME)


def fresh_state(monkeypatch, tmp_path, **env):
    """This process as if nothing had been loaded yet (no library is loaded by these scenarios)."""
    for k, v in {"loaded": None, "reason": "not tried", "path": None}.items():
        monkeypatch.setitem(native._STATE, k, v)
    monkeypatch.setattr(native, "PREBUILT_ROOT", str(tmp_path / "no-prebuilt"))
    for k in ("FASTDELTA_NATIVE_LIB", "FASTDELTA_NATIVE", "CXX"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_broken_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    from fastdelta.kernels import dispatch, reference_distance
    calls = tmp_path / "calls"
    cc = tmp_path / "broken-cc"
    cc.write_text(f"#!/bin/sh\necho run >> '{calls}'\n"
                  "echo 'broken-cc: error: simulated compiler failure' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    t, s, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.rand(3)
    runs = []
    for _ in range(2):  # a second process does not run the failing build again
        fresh_state(monkeypatch, tmp_path, FASTDELTA_CACHE=str(tmp_path / "cache"), CXX=str(cc))
        with pytest.warns(RuntimeWarning, match="(?s)native CPU kernel unavailable.*simulated compiler failure"):
            assert dispatch.resolve("auto", t) == "reference"
        assert torch.equal(dispatch.fm_distance(t, s, w), reference_distance(t, s, w))
        assert not native.available() and "simulated compiler failure" in native.status()["reason"]
        runs.append(len(calls.read_text().split()))  # CMake's configure runs the compiler a few times
    assert runs[0] > 0 and runs[1] == runs[0], runs
    # kernels/build_native.py ("build now") retries, and reports the failure in its exit status
    env = {**os.environ, "FASTDELTA_CACHE": str(tmp_path / "cache"), "CXX": str(cc)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "build_native.py"), "--quiet"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "not built" in r.stderr and "simulated compiler failure" in r.stderr, r.stderr
    assert len(calls.read_text().split()) > runs[0]


def test_native_off_by_env(monkeypatch, tmp_path, recwarn):
    """FASTDELTA_NATIVE=0: nothing compiled or looked up, no warning, the reference path."""
    from fastdelta.kernels import dispatch
    fresh_state(monkeypatch, tmp_path, FASTDELTA_CACHE=str(tmp_path / "cache"), FASTDELTA_NATIVE="0",
                CXX=str(tmp_path / "no-cxx"))
    assert dispatch.resolve("auto", torch.zeros(1, 1, 1, 1)) == "reference"
    assert "FASTDELTA_NATIVE=0" in native.status()["reason"]
    assert not (tmp_path / "cache").exists() and not recwarn.list


def test_editable_install_uses_the_native_kernel(first_build, tmp_path):
    """`pip install -e` (what scripts/setup.sh runs) into a fresh venv: the CPU distance runs natively.
    The venv sees torch through --system-site-packages; pip comes from there too (--without-pip)."""
    cache, _ = first_build
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-e", ROOT],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert any(n.startswith("fastdelta-") and n.endswith(".dist-info") for n in os.listdir(site))
    res, err = finish(start(cache, python=py, cwd=tmp_path))  # cwd outside the checkout: the installed package
    assert res["impl"] == "native" and res["available"], (res, err)
    assert res["module"].startswith(os.path.join(ROOT, "fastdelta")) and COMPILING not in err, (res, err)


def test_no_build_inside_a_compile_trace(monkeypatch, tmp_path):
    """A torch.compile(fullgraph=True) trace before the first eager use does not try to compile (it could
    not): the traced graph takes the reference path."""
    from fastdelta.kernels import dispatch, reference_distance
    fresh_state(monkeypatch, tmp_path, FASTDELTA_CACHE=str(tmp_path / "cache"))
    monkeypatch.setattr(native, "build_library", lambda *a, **k: pytest.fail("compiled inside a trace"))
    t, s, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.rand(3)
    got = torch.compile(lambda a, b: dispatch.fm_distance(a, b, w), fullgraph=True, backend="eager")(t, s)
    assert torch.allclose(got, reference_distance(t, s, w)) and native._STATE["loaded"] is None


def test_native_cache_can_be_set_apart_from_the_attention_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDELTA_CACHE", str(tmp_path / "a"))
    assert native.cache_root() == str(tmp_path / "a" / "native")
    monkeypatch.setenv("FASTDELTA_NATIVE_CACHE", str(tmp_path / "n"))
    assert native.cache_root() == str(tmp_path / "n")


def test_missing_cmake_warns_and_falls_back(monkeypatch, tmp_path):
    from fastdelta.kernels import dispatch
    fresh_state(monkeypatch, tmp_path, FASTDELTA_CACHE=str(tmp_path / "cache"))
    monkeypatch.setattr(native, "tool", lambda name: None)
    with pytest.warns(RuntimeWarning, match="(?s)native CPU kernel unavailable.*cmake not found"):
        assert dispatch.resolve("auto", torch.zeros(1, 1, 1, 1)) == "reference"


# The ops of a library built outside fastdelta, against the PyTorch reference (float64 / float32, both
# layouts, with and without the ReLU). FASTDELTA_NATIVE=0: importing fastdelta loads no other library.
CHECK_OPS = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    from fastdelta.kernels.op import reference_grad, reference_losses
    ops, g = torch.ops.fastdelta_native, torch.Generator().manual_seed(0)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for relu in (True, False):
                t, s = (torch.randn(3, 6, 7, 9, generator=g, dtype=dtype).contiguous(memory_format=fmt) for _ in "ts")
                w, go = torch.rand(6, generator=g), torch.randn(3, generator=g, dtype=dtype)
                want = reference_losses(t.double(), s.double(), w.double(), relu)
                torch.testing.assert_close(ops.fm_distance_fwd(t, s, w, relu).double(), want, rtol=rtol, atol=0)
                torch.testing.assert_close(ops.fm_distance_bwd(go, t, s, w, relu),
                                           reference_grad(go, t, s, w, relu), rtol=rtol, atol=1e-12)
    print("OPS OK")
""")


@pytest.mark.skipif(native.tool("cmake") is None, reason="cmake is not installed (pip install cmake ninja)")
def test_cmake_builds_the_kernel_in_a_fresh_folder(tmp_path):
    """CMakeLists.txt and kernels/ alone, copied into a fresh folder: CMake configures (torch found through
    its cmake prefix path) and builds the library, whose ops match the PyTorch reference."""
    src, build = tmp_path / "src", tmp_path / "build"
    shutil.copytree(os.path.join(ROOT, "kernels"), src / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(os.path.join(ROOT, "CMakeLists.txt"), src / "CMakeLists.txt")
    cmake, ninja = native.tool("cmake"), native.tool("ninja")
    configure = [cmake, "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (configure + (["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []),
                [cmake, "--build", str(build)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lib = build / native.LIB_NAME
    r = subprocess.run([sys.executable, "-c", CHECK_OPS, str(lib)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "FASTDELTA_NATIVE": "0"})
    assert r.returncode == 0 and "OPS OK" in r.stdout, r.stderr[-3000:]


def test_non_editable_build_carries_the_cmake_project(tmp_path):
    """setup.py's build_py copies CMakeLists.txt and the kernel sources into the package; installed there,
    native.py builds that copy, under the same key as the checkout."""
    lib = tmp_path / "lib"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT,
                       env={**os.environ, "FASTDELTA_SKIP_NATIVE": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    project = lib / "fastdelta" / "kernels" / "_native_src"
    assert (project / "CMakeLists.txt").read_bytes() == open(os.path.join(ROOT, "CMakeLists.txt"), "rb").read()
    assert (project / "kernels" / "csrc" / "fm_distance.cpp").is_file()
    code = "from fastdelta.kernels import native; print(native.PROJECT); print(native.current_key())"
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(lib), "FASTDELTA_NATIVE": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(project), native.current_key()]
