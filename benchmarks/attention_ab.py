"""The CPU attention's forward+backward, median of 40 calls, in whichever gptfast ``PYTHONPATH`` selects.

    PYTHONPATH=/path/to/other/checkout python benchmarks/attention_ab.py

Run it alternately against two checkouts (each with its own built extension) to compare a kernel change
before and after on one machine; prints ``{"mha": ms, "gqa": ms}``.  mha: B2 H12 T256 D64 (the benchmark
shape); gqa: B4 H8 over 2 kv heads, T256 D64 (the Llama-shaped training step's).
"""

import sys, time, torch, json
torch.set_num_threads(2)
import gptfast.ops as O
res = {}
for name, (B,H,Hkv,T,D) in {"mha": (2,12,12,256,64), "gqa": (4,8,2,256,64)}.items():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B,H,T,D, generator=g, requires_grad=True); k = torch.randn(B,Hkv,T,D, generator=g, requires_grad=True); v = torch.randn(B,Hkv,T,D, generator=g, requires_grad=True)
    go = torch.randn(B,H,T,D, generator=g)
    def run():
        out = O.causal_attention(q,k,v, backend="cpu"); torch.autograd.grad(out, (q,k,v), go)
    for _ in range(5): run()
    ts=[]
    for _ in range(40):
        s=time.perf_counter(); run(); ts.append(time.perf_counter()-s)
    ts.sort(); res[name] = round(ts[len(ts)//2]*1e3, 3)
print(json.dumps(res))
