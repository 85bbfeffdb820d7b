"""Fill Triton's on-disk kernel cache in parallel before a timed GPU run.

Triton compiles each kernel specialization on first use, one at a time, in the calling
process: one fused forward is ~50 distinct kernels, a minute or more of a short device
lease. Here every (variant, dtype, batch) forward is cut into N interleaved parts: worker k
runs the plan with the Triton kernels for steps k, k+N, ... and the PyTorch reference (no
compile) for the others, so each worker compiles only its share, into the shared cache
(~/.triton/cache), and the benchmark that follows only loads them. NextViT-S/B/L share their
channel widths, so S alone covers B and L's kernels.

    python bench/warm_cache.py --variants s --dtype fp16,bf16 --batch 1,256 -j 8
    python bench/warm_cache.py --cpu-check     # the partition logic, interpreter, tiny model
"""
import itertools
import multiprocessing as mp
import os
import sys
import time

from nextvit_kernels import cli


class _Share:
    """A fused.run backend: Triton for this worker's steps, the reference for the others."""

    def __init__(self, ops, part, parts):
        self.ops, self.part, self.parts, self.step, self.mine = ops, part, parts, 0, 0

    def __getattr__(self, op):
        if op.startswith("_"):
            raise AttributeError(op)
        fn = getattr(self.ops, op)

        def call(*args, impl=None, **kwargs):
            mine = self.step % self.parts == self.part
            self.step += 1
            self.mine += mine
            return fn(*args, impl="triton" if mine else "reference", **kwargs)
        return call


def _work(job):
    variant, dtype_name, batch, res, part, parts, device = job
    import torch

    import nextvit_kernels as nk
    from nextvit_kernels import fused, ops

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    t = time.perf_counter()
    if device == "cpu":  # --cpu-check: a tiny model under the interpreter
        model = nk.NextViT(depths=(1, 1, 5, 1), num_classes=10).eval()
    else:
        model = getattr(nk, variant)().eval()
    plan = fused.fold(model, device, dtype)
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    share = _Share(ops, part, parts)
    with torch.no_grad():
        fused.run(plan, x, backend=share)
    if device == "cuda":
        torch.cuda.synchronize()
    return (f"{variant} {dtype_name} batch {batch} @{res} part {part + 1}/{parts}: {share.mine} of "
            f"{share.step} steps on Triton, {time.perf_counter() - t:.1f} s", share.mine, share.step)


def main(argv=None):
    p = cli.parser(__doc__, prog="python bench/warm_cache.py")
    p.add_argument("--variants", type=cli.variants, default="s",
                   help="comma list of s, b, l (S alone covers B's and L's kernels)")
    p.add_argument("--dtype", type=cli.dtypes, default="fp16,bf16", help=f"comma list of {', '.join(cli.DTYPES)}")
    p.add_argument("--batch", type=cli.batches, default="1,8,64,256", help="comma list of batch sizes")
    p.add_argument("--res", type=cli.csv("resolution", conv=cli.positive_int), default="224",
                   help="comma list of input sizes")
    p.add_argument("-j", "--jobs", type=cli.positive_int, default=min(8, os.cpu_count() or 1),
                   help="worker processes")
    p.add_argument("--parts", type=cli.positive_int, help="parts per forward (default: --jobs)")
    p.add_argument("--cpu-check", action="store_true",
                   help="check the partition logic on the CPU: interpreter, tiny model, fp32, 2 workers")
    args = p.parse_args(argv)
    if args.cpu_check:
        cli.not_used(p, argv, ("variants", "dtype", "batch", "res", "jobs"), "with --cpu-check")
        os.environ["TRITON_INTERPRET"] = "1"
        args.variants, args.dtype, args.batch, args.res, args.jobs = ["s"], ["fp32"], [1], [32], 2
    import torch

    device = "cpu" if args.cpu_check else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("warm_cache: needs a CUDA GPU (it compiles by running the kernels); --cpu-check checks "
              "the partition logic here", file=sys.stderr)
        return 2
    parts = args.parts or args.jobs
    jobs = [(cli.VARIANTS[v], d, b, r, k, parts, device)
            for v, d, b, r in itertools.product(args.variants, args.dtype, args.batch, args.res)
            for k in range(parts)]
    t = time.perf_counter()
    # Largest batches first so the memory-heavy forwards do not all run at the end together.
    jobs.sort(key=lambda j: -j[2])
    mine, total = 0, 0
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for i, (msg, n_mine, n_steps) in enumerate(pool.imap_unordered(_work, jobs), 1):
            print(f"[{i}/{len(jobs)}] {msg}", flush=True)
            mine, total = mine + n_mine, total + n_steps
    forwards = len(jobs) // parts
    print(f"warm_cache: {forwards} forwards in {parts} parts each, {mine} of {total // parts * forwards} "
          f"steps on Triton, in {time.perf_counter() - t:.0f} s", flush=True)
    # every step of every forward ran on Triton in exactly one part
    return 0 if mine * parts == total else 1


if __name__ == "__main__":
    sys.exit(main())
