"""Runs vLLM's offline `LLM` once, as a subprocess of the loader tests, and reports what it saw.

Usage: python loader_probe.py MODEL_DIR ENGINE_JSON PROMPTS_JSON [--bench TOKENS] [--hold]
Prints `RESULT {"tokens": [[ids...]...], "tokens_per_s": float|null, "pid": int}`; with --hold it
then prints `READY` and keeps the engine alive until stdin closes, so a test can inspect the
processes' memory while the model is loaded.
"""

import json
import os
import sys
import time

if __name__ == "__main__":
    model_dir, engine, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    bench = int(sys.argv[sys.argv.index("--bench") + 1]) if "--bench" in sys.argv else 0
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.pop("kv_cache_space_gib", 1))
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=0, **engine)
    tokens = []
    for item in prompts:  # one at a time, so batch order cannot break a near-tie
        out = llm.generate(
            [item["prompt"]], SamplingParams(temperature=0, max_tokens=item["max_tokens"]), use_tqdm=False
        )
        tokens.append(list(out[0].outputs[0].token_ids))
    rate = None
    if bench:
        params = SamplingParams(temperature=0, max_tokens=bench, ignore_eos=True)
        llm.generate(["warm up"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        out = llm.generate(["Once upon a time"], params, use_tqdm=False)
        rate = len(out[0].outputs[0].token_ids) / (time.perf_counter() - start)
    print("RESULT " + json.dumps({"tokens": tokens, "tokens_per_s": rate, "pid": os.getpid()}), flush=True)
    if "--hold" in sys.argv:
        print("READY", flush=True)
        sys.stdin.read()
