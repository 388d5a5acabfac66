"""bench.py compares like with like and answers a user's mistake before
measuring: PyTorch's training step is llm's (clip, AdamW's settings) on the
CPU and the GPU alike; a bad --torch-python or contradictory flags end the
run at once in one line; a PyTorch worker that dies mid-run costs the
PyTorch figures, not the headline. The measurements are stubbed: speed is
measured only in bench.py itself."""
import json
import sys
import types

import numpy as np
import pytest

import bench
import llm

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=19)


def test_pytorch_training_step_is_llms():
    """Three steps from the same weights and batch give the same weights:
    the same clipping and AdamW (betas, decay on matrices only) on both sides."""
    torch = pytest.importorskip("torch")
    model = llm.GPT(llm.GPTConfig(**TINY, dtype="float64"), seed=0)   # float64: Adam magnifies the
    tm = bench.torch_gpt2(TINY, "cpu").double()                        # rounding of near-zero gradients
    ours = {"wte.weight": tm.wte.weight, "wpe.weight": tm.wpe.weight, "ln_f.weight": tm.ln_f.weight,
            "ln_f.bias": tm.ln_f.bias}
    for name, p in tm.h[0].named_parameters():           # llm's (in, out) matrices are nn.Linear's transposed
        theirs = {"c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc",
                  "mlp_proj": "mlp.c_proj"}.get(name.split(".")[0], name.split(".")[0])
        ours[f"h.0.{theirs}.{name.split('.')[1]}"] = p
    assert ours.keys() == model.params.keys()
    as_llm = lambda name, a: a.T if name.startswith("h.") and a.ndim == 2 else a
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(torch.from_numpy(as_llm(name, model.params[name]).copy()))
    rng = np.random.default_rng(0)
    idx, tgt = (rng.integers(0, TINY["vocab_size"], (2, TINY["block_size"])) for _ in range(2))
    step, opt = bench.torch_train_step(tm, torch.from_numpy(idx), torch.from_numpy(tgt), lr=1e-2), llm.AdamW(lr=1e-2)
    for _ in range(3):
        step()
        bench.train_step(model, opt, idx, tgt)
    for name, p in ours.items():
        np.testing.assert_allclose(as_llm(name, p.detach().numpy()), model.params[name],
                                   rtol=1e-9, atol=1e-12, err_msg=name)
