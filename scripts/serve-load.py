#!/usr/bin/env python3
"""Load test for `ultramoe serve`: CLIENTS concurrent clients, each sending streaming
completions back to back for SECONDS, through the official OpenAI client. Reports
requests, failures, 429 refusals, and p50/p99 time to first token and inter-token
latency, as one JSON line on stdout. Exits non-zero when any request failed (a 429 is
not a failure: it is the server refusing work over capacity, as asked).

Usage: serve-load.py BASE_URL MODEL [--clients 64] [--seconds 30] [--max-tokens 32]
"""
import argparse
import asyncio
import json
import sys
import time

import openai

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("model")
ap.add_argument("--clients", type=int, default=64)
ap.add_argument("--seconds", type=float, default=30)
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--prompt", default="the router sends each token to")
args = ap.parse_args()


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


async def main():
    client = openai.AsyncOpenAI(base_url=args.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    ttft, itl = [], []
    counts = {"ok": 0, "failed": 0, "busy": 0, "tokens": 0}
    errors = []
    end = time.monotonic() + args.seconds

    async def one_client(i):
        while time.monotonic() < end:
            t0 = time.monotonic()
            last = None
            try:
                stream = await client.completions.create(
                    model=args.model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.7, seed=i, stream=True
                )
                async for chunk in stream:
                    now = time.monotonic()
                    if chunk.choices and chunk.choices[0].text:
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            itl.append(now - last)
                        last = now
                        counts["tokens"] += 1
                counts["ok"] += 1
            except openai.RateLimitError:
                counts["busy"] += 1
                await asyncio.sleep(0.05)
            except Exception as e:  # noqa: BLE001 - every other outcome is a failure
                counts["failed"] += 1
                errors.append(repr(e)[:200])

    t = time.monotonic()
    await asyncio.gather(*(one_client(i) for i in range(args.clients)))
    wall = time.monotonic() - t
    ms = lambda x: None if x is None else round(1000 * x, 1)
    out = {
        "clients": args.clients,
        "seconds": round(wall, 1),
        "requests_ok": counts["ok"],
        "requests_failed": counts["failed"],
        "refused_429": counts["busy"],
        "text_chunks_per_s": round(counts["tokens"] / wall, 1),
        "ttft_ms_p50": ms(pct(ttft, 50)),
        "ttft_ms_p99": ms(pct(ttft, 99)),
        "itl_ms_p50": ms(pct(itl, 50)),
        "itl_ms_p99": ms(pct(itl, 99)),
        "errors": errors[:3],
    }
    print(json.dumps(out))
    sys.exit(1 if counts["failed"] else 0)


asyncio.run(main())
