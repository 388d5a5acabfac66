"""Build the C kernels (fastops.c) into the importable module _fastops_HASH.

    python build_ext.py            # CPU build: -O3 -fopenmp, kernels picked at run time
    python build_ext.py --cuda     # CUDA build: nvcc -x cu fastops.c -> _fastops_cuda_HASH.so

From Python: `import build_ext; build_ext.build()` -> True on success.
The module lands next to this file as _fastops_HASH*.so (ignored by git),
HASH the start of fastops.c's sha256: a library built from another
fastops.c (before a `git pull`, say) is never loaded, and is removed by the
next build.
No -march=native: fastops.c chooses AVX-512 / AVX2 / portable code at run
time, so the .so runs on any x86-64 (and builds on ARM).
"""
import contextlib
import glob
import hashlib
import os
import shlex
import sys
import shutil
import sysconfig
import tempfile
import warnings

ROOT = os.path.dirname(os.path.abspath(__file__))


def api_cdef() -> str:
    """The C API for cffi: the declarations between fastops.c's API markers."""
    with open(os.path.join(ROOT, "fastops.c")) as f:
        src = f.read()
    return src[src.index("/* API begin */") + len("/* API begin */"):src.index("/* API end */")]


CDEF = api_cdef()


def source_hash() -> str:
    with open(os.path.join(ROOT, "fastops.c"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


MODULE = "_fastops_" + source_hash()                 # the CPU build of this fastops.c
FAILED = os.path.join(ROOT, "build", MODULE + ".failed")   # its build failed: not retried unasked


def built():
    """The path of this fastops.c's CPU build, or None."""
    found = glob.glob(os.path.join(ROOT, MODULE + ".*so")) + glob.glob(os.path.join(ROOT, MODULE + ".*pyd"))
    return found[0] if found else None


def _remove(*paths):
    for path in paths:
        with contextlib.suppress(FileNotFoundError):   # another builder (mpirun's ranks) was first
            os.remove(path)


def _remove_stale(keep):
    """Libraries built from another fastops.c (and their calibrations)."""
    found = sum((glob.glob(os.path.join(ROOT, "_fastops*" + e)) for e in (".so", ".pyd", ".json")), [])
    _remove(*(path for path in found if not os.path.basename(path).startswith(keep)))

HINT_CC = ("no working C compiler found: install one, e.g. `apt-get install gcc` "
           "(Debian/Ubuntu), `xcode-select --install` (macOS)")
HINT_OMP = ("OpenMP not available, fastops built single-threaded. For threads install "
            "it: `apt-get install libgomp1` (gcc) or `libomp-dev` (clang), "
            "on macOS `brew install libomp`; MSVC (Windows) ignores -fopenmp")


def _libomp_prefixes():
    """Homebrew's libomp (keg-only: not on the default search paths): its
    prefix from `brew --prefix libomp`, else the usual places (Apple silicon,
    Intel)."""
    import subprocess
    found = []
    brew = shutil.which("brew")
    if brew:
        try:
            r = subprocess.run([brew, "--prefix", "libomp"], capture_output=True, text=True,
                               timeout=30)
            if r.returncode == 0 and r.stdout.strip():
                found.append(r.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    found += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    return [p for p in dict.fromkeys(found) if os.path.exists(os.path.join(p, "include", "omp.h"))]


def compile_flags(openmp, platform=None):
    """(compile flags, link flags) for this platform. -std=gnu99 (not c99:
    GCC contracts a*b+c into FMAs only outside strict ISO mode) and
    -ffp-contract=fast for every compiler, so the portable kernels get fused
    multiply-adds too (NEON on ARM); -fno-math-errno lets sqrtf vectorise (fastops
    never reads errno), -fno-trapping-math the clamps in exp's loops (without
    it GCC leaves exp scalar for AVX2: fastops never enables FP traps; no
    result changes); -fno-wrapv undoes Python's -fwrapv (with it GCC must
    allow for wrapping indices and left LayerNorm's rows 4x slower; fastops
    never overflows an int); FO_EXTRA_CFLAGS is added everywhere."""
    platform = platform or sys.platform
    cflags = ["-O3", "-std=gnu99", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-fno-wrapv"]
    ldflags = []
    if openmp and platform == "darwin":        # Apple clang: libomp's driver flags
        cflags += ["-Xpreprocessor", "-fopenmp"]
        for prefix in _libomp_prefixes()[:1]:
            cflags.append("-I" + os.path.join(prefix, "include"))
            ldflags += ["-L" + os.path.join(prefix, "lib"), "-Wl,-rpath," + os.path.join(prefix, "lib")]
        ldflags.append("-lomp")
    elif openmp:
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    # As a shell splits it: a quoted value stays one flag. Not POSIX on Windows,
    # where a backslash separates folders (-IC:\libs), not escapes.
    try:
        cflags += shlex.split(os.environ.get("FO_EXTRA_CFLAGS", ""), posix=platform != "win32")
    except ValueError as e:                    # an unbalanced quote
        raise ValueError(f"FO_EXTRA_CFLAGS: {e}: {os.environ['FO_EXTRA_CFLAGS']!r}") from None
    return cflags, ldflags


@contextlib.contextmanager
def _quiet_compiler():
    """The compiler, a child process, writes to this process's stdout and
    stderr: into a file, thrown away, while it runs, so that a first use
    shows one warning, not a failed OpenMP attempt's errors (Apple's clang
    without libomp) or a compiler's warnings (`python build_ext.py` shows
    them all)."""
    if sys.stdout is None or sys.stderr is None:     # pythonw: no console to keep quiet
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _compile(openmp, verbose):
    """Compile fastops.c with cffi in a temp dir; copy the .so to ROOT."""
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    with open(os.path.join(ROOT, "fastops.c")) as f:
        src = f.read()
    cflags, ldflags = compile_flags(openmp)
    ffi.set_source(MODULE, src, extra_compile_args=cflags, extra_link_args=ldflags)
    tmp = tempfile.mkdtemp(prefix="fastops_build_")
    try:
        with (contextlib.nullcontext() if verbose else _quiet_compiler()):
            so = ffi.compile(tmpdir=tmp, verbose=verbose)
        dest = os.path.join(ROOT, os.path.basename(so))
        tmp_dest = f"{dest}.tmp-{os.getpid()}"   # several builders at once (mpirun's ranks) each write their own
        shutil.copy(so, tmp_dest)
        os.replace(tmp_dest, dest)  # atomic: a running import never sees half a file
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path):
    """The built module, loaded as llm.py will: ImportError or OSError if it cannot be."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _failed(why):
    """Says why, once: the marker keeps train.py from building again on every command."""
    print(f"fastops: build failed: {why}", file=sys.stderr)
    os.makedirs(os.path.dirname(FAILED), exist_ok=True)
    with open(FAILED, "w") as f:
        f.write(why + "\n")
    return False


def build(verbose=False):
    """Build _fastops next to this file. Returns True on success, False (with a
    message saying what to install, or the loader's error) if no compiler
    works or the library built does not load."""
    try:
        import cffi  # noqa: F401
    except ImportError:
        print("fastops: cffi missing: `pip install cffi`", file=sys.stderr)
        return False
    # The kernels' verdicts (llm.calibration_path), timed on the library built
    # before, maybe with other flags or without OpenMP: the next first use
    # measures again. Removed now, not after the build: another rank building
    # beside this one may meanwhile have timed its own build of the same flags.
    _remove(*glob.glob(os.path.join(ROOT, MODULE + ".calibration-*.json")))
    try:
        compile_flags(True)
    except ValueError as e:
        print(f"fastops: build failed: {e}", file=sys.stderr)
        return False
    unloadable = None
    for openmp in (True, False):
        try:
            path = _compile(openmp, verbose)
        except Exception as e:  # compiler or linker failure
            err = str(e)
            if verbose:
                print(f"fastops: build failed ({'with' if openmp else 'without'} OpenMP): {err}",
                      file=sys.stderr)
            continue
        try:
            module = _load(path)
        except (ImportError, OSError) as e:      # an OpenMP runtime the loader cannot find (then
            _remove(path)                        # without OpenMP), -fsanitize=address's symbols...
            unloadable = f"the library does not load ({e})"
            continue
        # A compiler that does not know -fopenmp (MSVC's spelling is /openmp)
        # may only warn, and build it single-threaded.
        if not openmp or not module.lib.fo_has_openmp():
            warnings.warn_explicit(HINT_OMP, UserWarning, "build_ext.py", 0)   # one line, as llm.py's
        if verbose:
            print(f"fastops: built {path}")
        _remove_stale(keep=(MODULE, "_fastops_cuda_" + source_hash()))
        _remove(FAILED)
        return True
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    why = unloadable or (HINT_CC if shutil.which(cc.split()[0]) is None else
                         "the compiler reported errors (`python build_ext.py` shows them)")
    return _failed(why)


# The CUDA build: the same fastops.c, compiled by nvcc as CUDA (its
# #ifdef __CUDACC__ section), into a plain shared library that llm.py opens
# with cffi's ABI mode (ffi.dlopen): no Python headers needed. CUDA_CDEF is
# what llm.py declares for it. The CUDA runtime is linked statically, so the
# .so needs only the NVIDIA driver (one recent enough for this nvcc).
CUDA_LIB = f"_fastops_cuda_{source_hash()}.so"
CUDA_CDEF = CDEF + """
const char *fo_cuda_error(void);
const char *fo_cuda_sync(void);
"""
CUDA_GENCODE = "arch=compute_90,code=[sm_90,compute_90]"   # H100/H200 + PTX for newer GPUs


def build_cuda(verbose=True, dest=None):
    """nvcc fastops.c -> _fastops_cuda_HASH.so next to this file. Returns 0 on
    success, 0 with a message when nvcc is absent (nothing to build), 1 on a
    compile error or an nvcc that does not run. `dest`: another path for the
    library (the tests use it). FO_CUDA_GENCODE replaces the -gencode value
    (e.g. "arch=compute_80,code=[sm_80,compute_80]" for an A100)."""
    import subprocess
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                nvcc = os.path.join(home, "bin", "nvcc")
    if nvcc is None:
        print("fastops CUDA build: nvcc not found (install the CUDA toolkit, or set NVCC): "
              "nothing built")
        return 0
    dest = dest or os.path.join(ROOT, CUDA_LIB)
    gencode = os.environ.get("FO_CUDA_GENCODE", CUDA_GENCODE)
    cmd = [nvcc, "-O3", "-x", "cu", "-shared", "-Xcompiler", "-fPIC", "-std=c++17",
           "-gencode", gencode, "-cudart", "static",
           os.path.join(ROOT, "fastops.c"), "-o", dest + ".tmp"]
    if verbose:
        print(" ".join(cmd))
    try:
        r = subprocess.run(cmd)
    except OSError as e:                    # NVCC names no program: missing, a folder, not executable
        print(f"fastops CUDA build: NVCC={nvcc} does not run ({e.strerror}): expected the path of "
              "CUDA's nvcc, e.g. /usr/local/cuda/bin/nvcc", file=sys.stderr)
        return 1
    if r.returncode != 0:
        print(f"fastops CUDA build: nvcc failed (exit {r.returncode})", file=sys.stderr)
        return 1
    os.replace(dest + ".tmp", dest)
    if verbose:
        print(f"fastops: built {dest}")
    return 0


def main(argv):
    import argparse
    parser = argparse.ArgumentParser(prog="build_ext.py", description="Build fastops.c's kernels "
                                     "into _fastops_HASH*.so beside this file (CPU: -O3 -fopenmp).")
    parser.add_argument("--cuda", action="store_true", help="the CUDA build instead, with nvcc "
                        "(NVCC, FO_CUDA_GENCODE): _fastops_cuda_HASH.so")
    if parser.parse_args(argv).cuda:
        return build_cuda()
    ok = build(verbose=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
