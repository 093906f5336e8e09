"""PyTorch eager baseline for scripts/bench.sh: the training step fleet-train takes, in PyTorch.

Builds transformers' BertForSequenceClassification from the config.json fleet-train exported (same
sizes, vocabulary and labels), then times steps of batch B x sequence L of random tokens: forward,
cross-entropy, backward, gradient clipping to norm 1, AdamW. Prints one JSON line with the median
step time in milliseconds of the steps after the first (warm-up).

usage: bench_train.py MODEL_DIR BATCH SEQ STEPS DEVICE PRECISION
"""
import json
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

model_dir, batch, seq, steps, device, precision = sys.argv[1:7]
batch, seq, steps = int(batch), int(seq), int(steps)
torch.manual_seed(0)
config = BertConfig.from_pretrained(model_dir)
config.attn_implementation = "sdpa"
model = BertForSequenceClassification(config).to(device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
mask = torch.ones_like(ids)
labels = torch.randint(0, config.num_labels, (batch,), device=device)
autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


times = []
for _ in range(steps):
    sync()
    start = time.perf_counter()
    with autocast:
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    sync()
    times.append((time.perf_counter() - start) * 1000)
print(json.dumps({"step_ms": statistics.median(times[1:] or times), "threads": torch.get_num_threads()}))
