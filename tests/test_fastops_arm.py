"""fastops.c's kernels in C alone (tests/fastops_check.c, against double
references): natively with every ISA this CPU has, with the portable kernels
alone (FO_PORTABLE_ONLY), and cross-compiled for aarch64 and run under
qemu-user, the path an ARM machine (an Apple M-series Mac) takes; and on x86
CPUs without AVX-512 or without AVX, under qemu-user too.

The aarch64 run needs Debian's gcc-aarch64-linux-gnu and qemu-user (.ci/run
installs them). Without them it skips with a message, except under CI (CI=true
or LLM_REQUIRE_ARM=1), where it fails: the ARM path must be checked there.
Also: build_ext.py's compiler flags (FMA contraction everywhere; Homebrew's
libomp and FO_EXTRA_CFLAGS on macOS).
"""
import os
import re
import shutil
import subprocess

import pytest

import build_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "tests", "fastops_check.c")
FLAGS = build_ext.compile_flags(openmp=True, platform="linux")[0]       # the library's own (-O3 ...)
REQUIRE = os.environ.get("CI") == "true" or os.environ.get("LLM_REQUIRE_ARM") == "1"


def run_check(cmd_build, cmd_run):
    b = subprocess.run(cmd_build, capture_output=True, text=True)
    assert b.returncode == 0, b.stderr[-3000:]
    r = subprocess.run(cmd_run, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "0 failed" in r.stdout, r.stdout[-3000:]
    return r.stdout


@pytest.mark.parametrize("portable", [False, True])
def test_kernels_in_c_native(tmp_path, portable):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = str(tmp_path / "check")
    extra = ["-DFO_PORTABLE_ONLY"] if portable else []
    out = run_check([cc, *FLAGS, *extra, CHECK, "-lm", "-o", exe], [exe])
    if portable:
        assert "kernels generic" in out


def test_kernels_on_aarch64_under_qemu(tmp_path):
    gcc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if gcc is None or qemu is None:
        msg = ("aarch64 cross-compiler or qemu-user missing: `apt-get install "
               "gcc-aarch64-linux-gnu qemu-user` (Debian/Ubuntu)")
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)
    exe = str(tmp_path / "check_aarch64")
    out = run_check([gcc, *FLAGS, CHECK, "-lm", "-o", exe],
                    [qemu, "-L", "/usr/aarch64-linux-gnu", exe])
    assert "kernels generic" in out


@pytest.mark.parametrize("cpu,isa", [("Haswell", "avx2 (2 ISAs)"), ("Nehalem", "generic (1 ISA)")])
def test_kernels_on_older_x86_under_qemu(tmp_path, cpu, isa):
    """On an x86 CPU without AVX-512 (Haswell: AVX2) or without AVX at all
    (Nehalem), emulated: the dispatch picks the kernels it has, and none of
    them runs an instruction it lacks (the emulator stops at one, SIGILL)."""
    cc, qemu = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"), shutil.which("qemu-x86_64")
    if cc is None or qemu is None or os.uname().machine != "x86_64":
        msg = "an x86_64 machine with a C compiler and qemu-user (`apt-get install qemu-user`)"
        if REQUIRE and cc is not None and os.uname().machine == "x86_64":
            pytest.fail("missing: " + msg)
        pytest.skip("needs " + msg)
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    major_minor = tuple(int(n) for n in re.findall(r"version (\d+)\.(\d+)", version)[0]) if "version" in version else ()
    if isa.startswith("avx2") and major_minor < (7, 2):          # (older ones emulate no AVX: generic kernels)
        pytest.skip(f"qemu-user 7.2 or later emulates AVX2; here: {version.splitlines()[0] if version else '?'}")
    exe = str(tmp_path / "check")
    out = run_check([cc, *FLAGS, CHECK, "-lm", "-o", exe], [qemu, "-cpu", cpu, exe])
    assert f"kernels {isa}" in out, out[-500:]


def test_portable_kernel_contracts_fmas_on_aarch64(tmp_path):
    """With build_ext.py's flags the portable micro-kernels compile to NEON
    fused multiply-adds (with -std=c99 GCC emits separate multiplies and adds)."""
    gcc, objdump = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("aarch64-linux-gnu-objdump")
    if gcc is None or objdump is None:
        if REQUIRE:
            pytest.fail("aarch64-linux-gnu-gcc missing: apt-get install gcc-aarch64-linux-gnu")
        pytest.skip("aarch64-linux-gnu-gcc missing")
    obj = str(tmp_path / "fastops.o")
    cflags, _ = build_ext.compile_flags(openmp=True, platform="linux")
    b = subprocess.run([gcc, *cflags, "-c", os.path.join(ROOT, "fastops.c"), "-o", obj],
                       capture_output=True, text=True)
    assert b.returncode == 0, b.stderr[-3000:]
    dis = subprocess.run([objdump, "-d", obj], capture_output=True, text=True).stdout
    for fn in ("ukern_generic", "smk_gen_4"):
        body = dis.split(f"<{fn}>:")[1].split("\n\n")[0]
        assert "fmla" in body and "v" in body, f"{fn}: no vector FMA in\n{body[:2000]}"


def test_build_flags(monkeypatch):
    monkeypatch.setenv("FO_EXTRA_CFLAGS", "-DX=1 -g")
    monkeypatch.setattr(build_ext, "_libomp_prefixes", lambda: ["/opt/homebrew/opt/libomp"])
    for platform in ("linux", "darwin", "win32"):
        cflags, ldflags = build_ext.compile_flags(True, platform)
        assert "-ffp-contract=fast" in cflags and "-std=gnu99" in cflags and "-fno-wrapv" in cflags, platform
        assert cflags[-2:] == ["-DX=1", "-g"], platform        # honoured everywhere
    monkeypatch.setenv("FO_EXTRA_CFLAGS", "-I'/opt/my libs/include' -DNAME=\"a b\"")    # quoted, as in a shell
    for platform in ("linux", "darwin"):
        assert build_ext.compile_flags(True, platform)[0][-2:] == ["-I/opt/my libs/include", "-DNAME=a b"]
    monkeypatch.setenv("FO_EXTRA_CFLAGS", r"-IC:\libs\include -DX=1")    # Windows: \ separates folders
    assert build_ext.compile_flags(True, "win32")[0][-2:] == [r"-IC:\libs\include", "-DX=1"]
    cflags, ldflags = build_ext.compile_flags(True, "darwin")
    assert "-I/opt/homebrew/opt/libomp/include" in cflags and "-Xpreprocessor" in cflags
    assert "-L/opt/homebrew/opt/libomp/lib" in ldflags and "-lomp" in ldflags
    cflags, ldflags = build_ext.compile_flags(False, "darwin")
    assert "-lomp" not in ldflags and not any("fopenmp" in f for f in cflags)
