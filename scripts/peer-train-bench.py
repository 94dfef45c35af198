"""The PyTorch peer of `ultramoe bench train` for any config.json transformers knows:
one training step (forward + backward + AdamW) in float32 on CPU, all cores, random
tokens; prints one JSON line with the median step time. Run it alternating with
`ultramoe bench train --config CONFIG --batch B --seq T` and quote the ratio of medians.

Usage: PYTHON scripts/peer-train-bench.py CONFIG.json [batch] [seq] [steps]
(PYTHON: a virtual environment with torch and transformers, e.g. ../shared/peers/setup_pytorch.sh's)"""
import json, sys, time

import torch
import transformers

path = sys.argv[1]
given = [int(a) for a in sys.argv[2:5]]
batch, seq, steps = given + [8, 256, 8][len(given):]
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained(path.rsplit("/", 1)[0] if path.endswith(".json") else path)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, config.vocab_size, (batch, seq))
times = []
for i in range(steps + 2):  # the first two warm up
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
times = sorted(times[2:])
median = times[len(times) // 2]
print(json.dumps({"config": path, "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
                  "tokens_per_step": batch * seq, "median_step_s": median, "tokens_per_s": batch * seq / median}))
