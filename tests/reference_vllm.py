"""Greedy outputs of vLLM's own offline `LLM` for given prompts (run as a subprocess by tests).

Usage: python reference_vllm.py MODEL_DIR PROMPTS_JSON ENGINE_JSON -> prints JSON token ids.
Each prompt is generated on its own, so batch order cannot break a near-tie.
"""

import json
import os
import sys

if __name__ == "__main__":
    model_dir, prompts, engine = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.pop("kv_cache_space_gib", 1))
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=0, **engine)
    results = []
    for item in prompts:
        params = SamplingParams(temperature=0, max_tokens=item["max_tokens"])
        if "messages" in item:
            out = llm.chat([item["messages"]], params, use_tqdm=False)
        else:
            out = llm.generate([item["prompt"]], params, use_tqdm=False)
        results.append(list(out[0].outputs[0].token_ids))
    print("RESULT " + json.dumps(results))
