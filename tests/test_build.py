"""The build of fastops.c: a library is named after the source it was built
from, so one built before fastops.c changed is never loaded (llm.py warns
and runs NumPy; train.py rebuilds); a build that failed says what to do
once and is not retried on every command; a new build removes old ones; a
build without OpenMP's threads says so, in one warning, without the compiler's output;
a CPU build keeps this fastops.c's CUDA library; the CUDA build's nvcc command; without
fastops built, 'auto' is NumPy and 'fastops' refused."""
import importlib.machinery
import os
import shutil
import subprocess
import sys

import pytest

import build_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_project(tmp_path):
    for name in ("fastops.c", "build_ext.py", "llm.py", "train.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    shutil.copytree(os.path.join(ROOT, "data"), tmp_path / "data")
    return tmp_path


def python(cwd, code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("LLM_NUMPY", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**e, **env})


@pytest.fixture
def lone_build(tmp_path, monkeypatch):
    """build() into tmp_path, its compiler a copy of this checkout's library
    (quick: each test here builds nothing itself)."""
    lib = build_ext.built() or (build_ext.build() and build_ext.built())
    if not lib:
        pytest.skip("no C compiler builds fastops here")
    shutil.copy(os.path.join(ROOT, "fastops.c"), tmp_path)             # its hash names the build
    monkeypatch.setattr(build_ext, "ROOT", str(tmp_path))
    monkeypatch.setattr(build_ext, "FAILED", str(tmp_path / "build" / (build_ext.MODULE + ".failed")))
    monkeypatch.setattr(build_ext, "_compile", lambda openmp, verbose: shutil.copy(lib, tmp_path))
    return tmp_path


def test_a_library_built_from_an_older_fastops_c_is_not_loaded(tmp_path):
    d = copy_project(tmp_path)
    old = "_fastops_000000000000.cpython-311-x86_64-linux-gnu.so"
    lib = build_ext.built()
    (d / old).write_bytes(open(lib, "rb").read() if lib else b"not a library")
    r = python(d, "import llm; print(llm._fastops is None)")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    assert "built from an older fastops.c" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_build_is_said_once_and_not_retried(tmp_path):
    d = copy_project(tmp_path)
    broken = dict(CC="/bin/false", LDSHARED="/bin/false")
    first = python(d, "import train", **broken)
    assert first.returncode == 0 and "building it" in first.stdout and "build failed" in first.stderr, first
    again = python(d, "import train", **broken)
    assert again.returncode == 0 and "building" not in again.stdout and "build failed" not in again.stderr
    assert again.stderr.count("fastops") == 1                     # llm.py's one warning: NumPy runs


def test_a_new_build_removes_the_old_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(build_ext, "ROOT", str(tmp_path))
    for name in ("_fastops.cpython-311.so", "_fastops_aaaaaaaaaaaa.so", "_fastops_cuda_aaaaaaaaaaaa.so",
                 "_fastops_bbbbbbbbbbbb.cpython-311.so", "_fastops_cuda_bbbbbbbbbbbb.so"):
        (tmp_path / name).write_bytes(b"")
    build_ext._remove_stale(keep=("_fastops_bbbbbbbbbbbb", "_fastops_cuda_bbbbbbbbbbbb"))
    assert sorted(os.listdir(tmp_path)) == ["_fastops_bbbbbbbbbbbb.cpython-311.so", "_fastops_cuda_bbbbbbbbbbbb.so"]


def test_a_build_without_threads_says_so(tmp_path):
    """A compiler that does not know -fopenmp and only warns (MSVC) builds
    fastops single-threaded: the build must say so, not pass it in silence."""
    d = copy_project(tmp_path)
    r = python(d, "import warnings, build_ext\n"
                  "flags = build_ext.compile_flags\n"
                  "build_ext.compile_flags = lambda openmp, platform=None: flags(False, platform)\n"
                  "with warnings.catch_warnings(record=True) as caught:\n"
                  "    warnings.simplefilter('always')\n"
                  "    assert build_ext.build()\n"
                  "print([str(w.message) for w in caught])")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fastops built single-threaded" in r.stdout


def test_a_first_use_without_openmp_shows_one_warning_not_the_compiler(tmp_path):
    """Apple's clang without Homebrew's libomp (most Macs): the OpenMP attempt
    fails on omp.h and the build without it succeeds. A first `python train.py`
    must show one warning that says what to install, not the failed attempt's
    errors and the compiler's warnings."""
    d = copy_project(tmp_path)
    r = python(d, "import build_ext\n"
                  "flags = build_ext.compile_flags\n"
                  "def no_libomp(openmp, platform=None):\n"
                  "    c, l = flags(openmp, platform)\n"
                  "    return (c + ['-include', 'omp_not_installed.h'] if openmp else c), l\n"
                  "build_ext.compile_flags = no_libomp\n"
                  "import train\n"
                  "print(build_ext.built() is not None)")
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stderr[-2000:]
    assert "fastops built single-threaded" in r.stderr
    shown = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(shown) == 1, r.stderr[-3000:]                   # the warning, one line
    assert "omp_not_installed" not in r.stderr and "warning:" not in r.stderr


def test_two_builders_at_once(lone_build, monkeypatch):
    """mpirun's ranks after a pull each build: what one removes, another
    has just removed."""
    (lone_build / "_fastops_aaaaaaaaaaaa.so").write_bytes(b"")
    os.makedirs(os.path.dirname(build_ext.FAILED))
    open(build_ext.FAILED, "w").close()
    remove = os.remove

    def raced(path):
        remove(path)                                 # the other builder, first
        remove(path)
    monkeypatch.setattr(os, "remove", raced)
    assert build_ext.build()
    assert build_ext.built() and not os.path.exists(build_ext.FAILED)
    assert not (lone_build / "_fastops_aaaaaaaaaaaa.so").exists()


def test_a_new_build_times_its_kernels_again(lone_build, monkeypatch):
    """The calibration (llm.calibration_path) is named after fastops.c, not
    after the flags: the one timed on the library built before (another
    FO_EXTRA_CFLAGS, no OpenMP then) goes. One written while this build ran
    stays: another rank's, on its build of the same fastops.c and flags."""
    stale = lone_build / (build_ext.MODULE + ".calibration-5.json")
    stale.write_text("{}")
    fresh = lone_build / (build_ext.MODULE + ".calibration-6.json")
    compile_ = build_ext._compile

    def compile_beside_another_rank(openmp, verbose):
        fresh.write_text("{}")
        return compile_(openmp, verbose)
    monkeypatch.setattr(build_ext, "_compile", compile_beside_another_rank)
    assert build_ext.build()
    assert not stale.exists() and fresh.exists()


def test_a_build_that_does_not_load_is_a_failed_build(lone_build, monkeypatch, capsys):
    """FO_EXTRA_CFLAGS=-fsanitize=address compiles and links, but the library
    does not load (undefined __asan symbols): the build says why, once, as a
    failed build, not "built" and then llm.py's "not built"."""
    def compile_unloadable(openmp, verbose):
        path = lone_build / (build_ext.MODULE + importlib.machinery.EXTENSION_SUFFIXES[0])
        path.write_bytes(b"not a library" * 100)
        return str(path)
    monkeypatch.setattr(build_ext, "_compile", compile_unloadable)
    assert build_ext.build(verbose=True) is False
    out, err = capsys.readouterr()
    assert "built" not in out and err.count("\n") == 1, (out, err)
    assert "fastops: build failed" in err and "does not load" in err, err
    assert sys.platform != "linux" or "invalid ELF header" in err, err           # the loader's own words
    assert build_ext.built() is None and os.path.exists(build_ext.FAILED)      # not retried by train.py


def test_a_build_that_loads_only_without_openmp_is_built_without(lone_build, monkeypatch, capsys):
    """An OpenMP runtime the loader cannot find: the build without OpenMP
    (it was never tried: the OpenMP build's load failure ended the build)."""
    good = build_ext._compile

    def compile_(openmp, verbose):
        if not openmp:
            return good(openmp, verbose)
        path = lone_build / (build_ext.MODULE + importlib.machinery.EXTENSION_SUFFIXES[0])
        path.write_bytes(b"not a library" * 100)
        return str(path)
    monkeypatch.setattr(build_ext, "_compile", compile_)
    with pytest.warns(UserWarning):                         # one line: no threads
        assert build_ext.build() is True
    assert build_ext.built() is not None and not os.path.exists(build_ext.FAILED)


def test_an_unbalanced_quote_in_fo_extra_cflags_is_named(lone_build, monkeypatch, capsys):
    monkeypatch.setenv("FO_EXTRA_CFLAGS", "-DX='a b")
    assert build_ext.build() is False
    assert "FO_EXTRA_CFLAGS" in capsys.readouterr().err


def test_a_cuda_build_alone_is_not_an_older_cpu_build(tmp_path):
    """`python build_ext.py --cuda` without a CPU build: the CUDA library of
    this very fastops.c is no sign of an older CPU build."""
    d = copy_project(tmp_path)
    (d / build_ext.CUDA_LIB).write_bytes(b"")
    r = python(d, "import llm")
    assert "fastops (the C kernels) is not built" in r.stderr and "older" not in r.stderr, r.stderr


def test_build_ext_knows_its_flags(tmp_path):
    """--help shows the usage and a typo (--cdua) is an error: neither builds."""
    d = copy_project(tmp_path)
    run = [sys.executable, "build_ext.py"]
    usage = subprocess.run(run + ["--help"], cwd=d, capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0 and "--cuda" in usage.stdout, usage
    typo = subprocess.run(run + ["--cdua"], cwd=d, capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "unrecognized arguments: --cdua" in typo.stderr, typo
    assert "Traceback" not in typo.stderr and not [n for n in os.listdir(d) if n.endswith(".so")]


@pytest.mark.parametrize("nvcc", ["/nonexistent/nvcc", "a folder"])
def test_a_wrong_nvcc_is_named(tmp_path, monkeypatch, capsys, nvcc):
    nvcc = str(tmp_path) if nvcc == "a folder" else nvcc
    monkeypatch.setenv("NVCC", nvcc)
    assert build_ext.build_cuda(verbose=False, dest=str(tmp_path / "lib.so")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"NVCC={nvcc}" in err and "expected" in err, err


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                    reason="not a git checkout")
def test_git_ignores_every_library_and_leftover():
    """A builder killed between its copy and the rename leaves NAME.tmp-PID
    (nvcc's NAME.tmp); Windows builds .pyd: none of them is for git status."""
    names = ["_fastops_0123456789ab.cpython-311-x86_64-linux-gnu.so.tmp-4242", "_fastops_cuda_0123456789ab.so.tmp",
             "_fastops_0123456789ab.cp311-win_amd64.pyd", "_fastops_0123456789ab.cp311-win_amd64.pyd.tmp-7"]
    r = subprocess.run(["git", "check-ignore", *names], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.split() == names, r


def test_without_fastops_the_backend_is_set_back_and_fastops_refused():
    """Without the kernels 'auto' is NumPy everywhere: a backend saved and set
    back works (the tests' [numpy] cases do it), 'fastops' is refused."""
    r = python(ROOT, "import llm; p = llm.set_backend('numpy'); print(p, llm.set_backend(p), llm.kernels_in_use())\n"
                     "llm.set_backend('fastops')", LLM_NUMPY="1")
    words = r.stdout.split(maxsplit=2)
    assert words[:2] == ["auto", "numpy"] and "'fastops'" not in words[2], r.stdout + r.stderr
    assert "RuntimeError: backend: fastops is not built" in r.stderr



def test_a_cpu_build_keeps_this_fastops_c_s_cuda_library(tmp_path, monkeypatch):
    """build() removes other sources' libraries, not the CUDA build of this very fastops.c."""
    lib = build_ext.built() or pytest.skip("fastops is not built")
    shutil.copy(os.path.join(build_ext.ROOT, "fastops.c"), tmp_path)
    monkeypatch.setattr(build_ext, "ROOT", str(tmp_path))
    monkeypatch.setattr(build_ext, "FAILED", str(tmp_path / "build" / "x.failed"))
    monkeypatch.setattr(build_ext, "_compile", lambda openmp, verbose: shutil.copy(lib, tmp_path))
    cuda = tmp_path / build_ext.CUDA_LIB
    old_cuda = tmp_path / "_fastops_cuda_000000000000.so"
    cuda.write_bytes(b""); old_cuda.write_bytes(b"")
    assert build_ext.build()
    assert cuda.exists() and not old_cuda.exists()


def test_the_cuda_build_s_command(tmp_path, monkeypatch):
    """nvcc compiles fastops.c as CUDA into a plain .so with the CUDA runtime linked statically,
    written to NAME.tmp and renamed."""
    seen = []

    def fake_run(cmd, *a, **kw):
        seen.append(cmd)
        open(cmd[cmd.index("-o") + 1], "w").close()
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("NVCC", "/opt/nvcc")
    monkeypatch.delenv("FO_CUDA_GENCODE", raising=False)
    dest = str(tmp_path / "lib.so")
    assert build_ext.build_cuda(verbose=False, dest=dest) == 0 and os.path.exists(dest)
    cmd = seen[0]
    assert cmd[0] == "/opt/nvcc" and cmd[cmd.index("-x") + 1] == "cu" and "-shared" in cmd
    assert cmd[cmd.index("-cudart") + 1] == "static" and cmd[cmd.index("-gencode") + 1] == build_ext.CUDA_GENCODE
    assert cmd[cmd.index("-Xcompiler") + 1] == "-fPIC"
    assert build_ext.CUDA_LIB == f"_fastops_cuda_{build_ext.source_hash()}.so"
