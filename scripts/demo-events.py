#!/usr/bin/env python3
"""Prints a realistic AI-usage stream as CloudEvents batches (one JSON array per line).

Usage: demo-events.py COUNT BATCH_SIZE [SEED]
Events: LLM token usage by model (input/output tokens), API requests, GPU compute seconds,
over the last hour, for a handful of customers. Values are exact decimals as strings where
a float would lose precision.
"""
import json
import random
import sys
import uuid
from datetime import datetime, timedelta, timezone

count, batch = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 42)
customers = ["acme-corp", "globex", "initech", "umbrella", "hooli"]
models = ["gpt-large", "gpt-small", "embed-v3"]
now = datetime.now(timezone.utc)

def event(i):
    kind = rng.random()
    t = now - timedelta(seconds=rng.randint(0, 3600))
    base = {
        "specversion": "1.0",
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "source": "llm-gateway",
        "subject": rng.choice(customers),
        "time": t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
    }
    if kind < 0.7:
        base["type"] = "llm.tokens"
        base["data"] = {"model": rng.choice(models), "input_tokens": rng.randint(10, 4000),
                        "output_tokens": rng.randint(1, 1500)}
    elif kind < 0.9:
        base["type"] = "api.request"
        base["data"] = {"endpoint": rng.choice(["/chat", "/embed", "/images"]), "status": 200}
    else:
        base["type"] = "compute.seconds"
        base["data"] = {"gpu": rng.choice(["a100", "h100"]), "seconds": f"{rng.uniform(0.1, 30):.3f}"}
    return base

out = []
for i in range(count):
    out.append(event(i))
    if len(out) == batch:
        print(json.dumps(out))
        out = []
if out:
    print(json.dumps(out))
