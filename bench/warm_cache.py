"""Fill Triton's on-disk kernel cache in parallel before a timed GPU run.

Triton compiles each kernel specialization on first use, one at a time, in the
calling process: the fused S/B/L models at four batch sizes and two dtypes are
a few hundred compiles, minutes of a short device lease. Running the same
forwards in N worker processes compiles them concurrently into the shared
cache (~/.triton/cache), so the benchmark that follows only loads them.

    python bench/warm_cache.py --variants s,b,l --dtype fp16,bf16 --batch 1,8,64,256 -j 8
"""
import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time

VARIANTS = {"s": "nextvit_small", "b": "nextvit_base", "l": "nextvit_large"}


def _work(job):
    variant, dtype_name, batch, res = job
    import torch

    import nextvit_kernels as nk

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    t = time.perf_counter()
    model = getattr(nk, variant)().eval().cuda().to(dtype)
    x = torch.randn(batch, 3, res, res, device="cuda", dtype=dtype)
    with torch.no_grad():
        model(x)
        model.forward_features(x)
    torch.cuda.synchronize()
    return f"{variant} {dtype_name} batch {batch} @{res}: {time.perf_counter() - t:.1f} s"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="s,b,l")
    p.add_argument("--dtype", default="fp16,bf16")
    p.add_argument("--batch", default="1,8,64,256")
    p.add_argument("--res", default="224")
    p.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("warm_cache: needs a CUDA GPU (it compiles by running the kernels)", file=sys.stderr)
        return 2
    jobs = list(itertools.product([VARIANTS[v] for v in args.variants.split(",")], args.dtype.split(","),
                                  [int(b) for b in args.batch.split(",")], [int(r) for r in args.res.split(",")]))
    t = time.perf_counter()
    # Largest batches first so the memory-heavy forwards do not all run at the end together.
    jobs.sort(key=lambda j: -j[2])
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for i, msg in enumerate(pool.imap_unordered(_work, jobs), 1):
            print(f"[{i}/{len(jobs)}] {msg}", flush=True)
    print(f"warm_cache: {len(jobs)} forwards in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
