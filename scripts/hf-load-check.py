#!/usr/bin/env python3
"""Loads a model directory ultramoe saved (config.json, model.safetensors, tokenizer
files) with Hugging Face transformers, and compares its logits for a text with
ultramoe's (`ultramoe grad`). Needs torch and transformers (../shared/peers/setup_pytorch.sh).

    python scripts/hf-load-check.py RUN/model "A banker is a fellow who lends you his umbrella"

Prints the tokenizers' agreement, the largest logit difference and transformers' greedy
continuation; exits non-zero when the tokenizations differ or the logits differ by more
than 1e-4 of the largest.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text = Path(sys.argv[1]), sys.argv[2]
ultramoe = sys.argv[3] if len(sys.argv) > 3 else "target/release/ultramoe"
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    ref = model(ids).logits[0]
with tempfile.TemporaryDirectory() as d:
    save_file({"input_ids": ids.to(torch.int64).contiguous()}, f"{d}/ids.safetensors")
    subprocess.run([ultramoe, "grad", "--model", str(model_dir), "--input-ids", f"{d}/ids.safetensors", "--out", f"{d}/out.safetensors"],
                   check=True, stdout=subprocess.DEVNULL)
    ours = load_file(f"{d}/out.safetensors")["logits"].reshape(ref.shape)
err = (ours - ref).abs().max().item()
scale = ref.abs().max().item()
print(f"{model.config.model_type}: {ids.shape[1]} tokens; transformers loaded {sum(p.numel() for p in model.parameters())} parameters")
print(f"largest logit difference {err:.3e} (largest logit {scale:.3f}, ratio {err / scale:.2e})")
out = model.generate(ids, max_new_tokens=24, do_sample=False)
print("transformers greedy continuation:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
sys.exit(0 if err <= 1e-4 * max(scale, 1.0) else 1)
