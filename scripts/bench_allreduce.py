"""PyTorch's own all-reduce of a model's gradients: the reference scripts/bench-net.sh measures
fleet-train against. The same number of fp32 values, in buckets of the same size, each scaled
into a flat buffer (bf16 with --dtype bf16, as DDP's compress hook does), all-reduced with Gloo
asynchronously and copied back once reduced. Started by `fleet run`, which gives it torchrun's
environment. Prints one JSON line per rank: the median milliseconds per step."""

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--params", type=int, required=True)
parser.add_argument("--bucket-mb", type=float, default=25.0)
parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()

dist.init_process_group("gloo")
world = dist.get_world_size()
wire = torch.bfloat16 if args.dtype == "bf16" else torch.float32
per_bucket = int(args.bucket_mb * (1 << 20)) // (2 if args.dtype == "bf16" else 4)
grads = [
    torch.randn(min(per_bucket, args.params - start))
    for start in range(0, args.params, per_bucket)
]
flats = [torch.empty(g.numel(), dtype=wire) for g in grads]
times = []
for _ in range(args.steps):
    dist.barrier()
    started = time.perf_counter()
    works = []
    for grad, flat in zip(grads, flats):
        torch.mul(grad, 1.0 / world, out=flat)
        works.append(dist.all_reduce(flat, async_op=True))
    for grad, flat, work in zip(grads, flats, works):
        work.wait()
        grad.copy_(flat)
    times.append((time.perf_counter() - started) * 1000)
print(json.dumps({"rank": dist.get_rank(), "allreduce_ms": statistics.median(times)}), flush=True)
dist.destroy_process_group()
