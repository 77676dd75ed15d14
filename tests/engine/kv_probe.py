"""A vLLM engine kept alive for the KV connector tests, driven by JSON lines on stdin.

Usage: python kv_probe.py MODEL_DIR ENGINE_JSON
Prints `READY`, then for each stdin line `{"prompts": [[ids...]...], "max_tokens": N,
"kv_transfer_params": [dict|null, ...]}` prints `RESULT [{"tokens", "num_cached_tokens",
"kv_transfer_params"}, ...]`. Prompts run one at a time, so one request's saved blocks are
in the store before the next one looks, and batch order cannot break a near-tie.
"""

import json
import os
import sys

if __name__ == "__main__":
    model_dir, engine = sys.argv[1], json.loads(sys.argv[2])
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.pop("kv_cache_space_gib", 1))
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=0, **engine)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        params = cmd.get("kv_transfer_params") or [None] * len(cmd["prompts"])
        results = []
        for ids, kv in zip(cmd["prompts"], params):
            extra = {"kv_transfer_params": kv} if kv is not None else None
            sp = SamplingParams(temperature=0, max_tokens=cmd["max_tokens"], ignore_eos=True, extra_args=extra)
            out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
            results.append(
                {
                    "tokens": list(out.outputs[0].token_ids),
                    "num_cached_tokens": out.num_cached_tokens,
                    "kv_transfer_params": out.kv_transfer_params,
                }
            )
        print("RESULT " + json.dumps(results), flush=True)
