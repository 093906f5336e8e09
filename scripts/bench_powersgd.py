"""PyTorch's own PowerSGD, the reference scripts/bench-net.sh measures `fleet-train
--powersgd-rank` against: DDP over Gloo with `powerSGD_hook` at the same rank.

Builds transformers' BertForSequenceClassification from the config.json fleet-train exported
(same sizes and vocabulary), wraps it in DDP (25 MB buckets, as fleet-train's `--bucket-mb`),
registers the hook with error feedback and warm start (PyTorch's defaults) and fleet-train's rule
for what to compress (`min_compression_rate=1`: every matrix whose factors are smaller), then
times steps of batch 1 x SEQ random tokens: forward, cross-entropy, backward (the hook compresses
and all-reduces each bucket as it fills), clipping to norm 1, AdamW. PyTorch needs two plain steps
before compressing (`start_powerSGD_iter` >= 2).

Started by `fleet run`, which gives it torchrun's environment. Prints one JSON line per rank: the
milliseconds of each compressed step after the first (the first allocates the factors), and the
bytes each rank put into the all-reduces of one compressed step (P, Q and the tensors sent whole,
in fp32), as the hook counts them.

usage: bench_powersgd.py --model DIR --rank R [--seq 16] [--steps 8]
"""
import argparse
import json
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--seq", type=int, default=16)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--bucket-mb", type=float, default=25.0)
args = parser.parse_args()

dist.init_process_group("gloo")
torch.manual_seed(0)
config = BertConfig.from_pretrained(args.model)
config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
model = DistributedDataParallel(
    BertForSequenceClassification(config).train(), bucket_cap_mb=args.bucket_mb
)
plain_steps = 2
state = powerSGD_hook.PowerSGDState(
    process_group=None,
    matrix_approximation_rank=args.rank,
    start_powerSGD_iter=plain_steps,
    min_compression_rate=1,
    use_error_feedback=True,
    warm_start=True,
)
model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
ids = torch.randint(0, config.vocab_size, (1, args.seq))
mask = torch.ones_like(ids)
labels = torch.randint(0, config.num_labels, (1,))

times = []
for step in range(args.steps):
    started = time.perf_counter()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    times.append((time.perf_counter() - started) * 1000)

# On every compressed step the hook adds, for each tensor, the values it sends: both factors of a
# tensor it compresses, the whole of one it does not.
sent = state.total_numel_after_compression / (args.steps - plain_steps)
print(
    json.dumps(
        {
            "rank": dist.get_rank(),
            "powersgd_step_ms": sum(times[plain_steps + 1 :]) / len(times[plain_steps + 1 :]),
            "powersgd_bytes_per_step": int(sent * 4),
        }
    ),
    flush=True,
)
dist.destroy_process_group()
