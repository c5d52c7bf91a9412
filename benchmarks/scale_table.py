"""docs/scale.md's memory table: Qwen2.5-VL-3B / -7B in bf16 at the presets' settings.

    python -m benchmarks.scale_table [--cpu-json bench-results/scale-cpu.json] [--gpu-json bench-results/gpu.json]

Every number is derived from exact parameter counts (the released configs instantiated on the
meta device: shared.real_configs) and per-token costs, some of them measured on CPU with the
`wide` model (the points24 prompt length and image tokens, the /v1/logits bytes per token);
where bench-results/gpu.json holds a measured figure for the same quantity it is printed beside.
The formulas are in `components` below, one line each, so docs/scale.md can cite them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GB = 1e9
# The presets (configs/points24-kl.yaml, -sft.yaml).
PRESET = dict(num_envs=4, num_steps=128, micro_batch=4, max_new_tokens=256, lora_r=128, teacher_batch=8,
              chunk=256, updates=30)
CUDA_OVERHEAD_GB = 1.0  # CUDA context + allocator slack per process (typical; not measured here)


def counts(size: str) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from shared.real_configs import lora_param_count, qwen25_vl_config, touched_param_count

    cfg = qwen25_vl_config(size)
    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration(cfg)
    t = cfg.text_config
    return {"params": sum(p.numel() for p in m.parameters()),
            "vision_params": sum(p.numel() for n, p in m.named_parameters() if ".visual." in n),
            "lora": lora_param_count(cfg, PRESET["lora_r"]), "touched": touched_param_count(cfg),
            "hidden": t.hidden_size, "inter": t.intermediate_size, "layers": t.num_hidden_layers,
            "kv_dim": t.num_key_value_heads * (t.hidden_size // t.num_attention_heads), "vocab": t.vocab_size,
            "tied": bool(cfg.tie_word_embeddings), "largest_module": t.hidden_size * t.intermediate_size}


def components(c: dict, prompt_tokens: int) -> dict:
    """GB per component (bf16 weights; fp32 LoRA as peft keeps it; one formula per line)."""
    P, L, H, I, V = c["params"], c["layers"], c["hidden"], c["inter"], c["vocab"]
    S = prompt_tokens + PRESET["max_new_tokens"]  # one step's sequence: prompt (with image) + completion
    T = PRESET["micro_batch"] * S  # tokens per PPO forward
    kv_per_token = L * 2 * c["kv_dim"] * 2  # K and V, bf16
    d = {}
    d["weights"] = 2 * P / GB
    d["lora_train"] = 16 * c["lora"] / GB  # fp32 param + grad + Adam m, v
    d["lora_bf16"] = 2 * c["lora"] / GB
    d["head_fp32"] = 4 * V * H / GB  # trainer's fp32 copy of the frozen head (fp32 log-probs)
    # Gradient checkpointing: each layer's input kept, one layer's internals live in backward.
    d["ppo_activations"] = (L * T * H * 2 + T * (4 * H + 4 * I) * 2 + T * H * 4 * 4) / GB
    d["logprob_chunk"] = 4 * PRESET["chunk"] * V * 4 / GB  # logits, masked, log-softmax, exp: fp32 [chunk, V]
    d["logprob_unchunked"] = 6 * PRESET["micro_batch"] * PRESET["max_new_tokens"] * V * 4 / GB  # before the fix
    d["rollout_kv"] = PRESET["num_envs"] * S * kv_per_token / GB
    d["teacher_w0"] = 2 * c["touched"] / GB  # bf16 W0 copies of every merged parameter
    # apply_delta builds every new bf16 tensor aside before the swap, via one module's fp32 W0, tau, sum.
    d["teacher_apply_transient"] = 2 * c["touched"] / GB + 3 * 4 * c["largest_module"] / GB
    d["teacher_score"] = (PRESET["teacher_batch"] * S * (H * 2 * 4 + I * 2 * 3)) / GB + 2 * PRESET["chunk"] * V * 4 / GB
    d["teacher_gen_kv"] = PRESET["teacher_batch"] * S * kv_per_token / GB
    d["policy_kv"] = PRESET["num_envs"] * S * kv_per_token / GB
    # Host RAM of the teacher's merge (merge_device cpu): K adapters (fp32, as uploaded), the merged
    # delta of every module in fp32, K dense deltas of the largest module.
    d["adapter_file"] = 4 * c["lora"] / GB
    d["merge_host_per_ckpt"] = 4 * c["lora"] / GB
    d["merge_host_fixed"] = 4 * c["touched"] / GB
    d["merge_host_dense_per_ckpt"] = 4 * c["largest_module"] / GB
    d["_S"], d["_T"] = S, T
    return d


def totals(d: dict, k_ckpts: int) -> dict:
    o = CUDA_OVERHEAD_GB
    trainer = d["weights"] + d["lora_train"] + d["head_fp32"] + d["ppo_activations"] + d["logprob_chunk"] + o
    trainer_old = trainer - d["logprob_chunk"] + d["logprob_unchunked"]
    serve = max(d["teacher_score"], d["teacher_gen_kv"])
    teacher_hf = d["weights"] + d["teacher_w0"] + d["teacher_apply_transient"] + serve + o
    teacher_hf_w0cpu = d["weights"] + max(d["teacher_score"], d["teacher_gen_kv"]) + o
    # vLLM: weights + its profiled activations (~1-2 GB at default batched tokens) + the KV the batch needs.
    teacher_vllm = d["weights"] + 2.0 + d["teacher_gen_kv"] + o
    policy_vllm = d["weights"] + d["lora_bf16"] + 2.0 + d["policy_kv"] + o
    policy_hf = d["weights"] + d["lora_bf16"] + d["policy_kv"] + o
    def host_merge_at(k: int) -> float:
        return k * (d["merge_host_per_ckpt"] + d["merge_host_dense_per_ckpt"]) + d["merge_host_fixed"]

    host_merge = host_merge_at(k_ckpts)
    return {"trainer": trainer, "trainer_before_chunking": trainer_old, "teacher_hf": teacher_hf,
            "teacher_hf_w0_on_cpu": teacher_hf_w0cpu, "teacher_vllm": teacher_vllm, "policy_vllm": policy_vllm,
            "policy_hf": policy_hf, "teacher_host_merge_ram": host_merge,
            "teacher_host_merge_ram_window8": host_merge_at(8)}


def fits(gb: float) -> str:
    return " / ".join("yes" if gb * 1.05 <= cap else "no" for cap in (24, 40, 80))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cpu-json", default="bench-results/scale-cpu.json")
    ap.add_argument("--gpu-json", default="bench-results/gpu.json")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    cpu = json.loads(Path(args.cpu_json).read_text()) if Path(args.cpu_json).exists() else {}
    prompt_tokens = cpu.get("points24_observation", {}).get("prompt_tokens", 300)
    out = {"preset": PRESET, "prompt_tokens": prompt_tokens, "sizes": {}}
    for size in ("3B", "7B"):
        c = counts(size)
        d = components(c, prompt_tokens)
        t = totals(d, PRESET["updates"])
        out["sizes"][size] = {"counts": c, "components_gb": {k: round(v, 3) for k, v in d.items()},
                              "totals_gb": {k: round(v, 2) for k, v in t.items()}}
    print(f"prompt tokens per points24 step (measured, wide model): {prompt_tokens}; S = {prompt_tokens} + "
          f"{PRESET['max_new_tokens']}")
    print("| process | 3B GB | fits 24/40/80 | 7B GB | fits 24/40/80 |\n|---|---|---|---|---|")
    for key in out["sizes"]["3B"]["totals_gb"]:
        a, b = out["sizes"]["3B"]["totals_gb"][key], out["sizes"]["7B"]["totals_gb"][key]
        print(f"| {key} | {a:.1f} | {fits(a)} | {b:.1f} | {fits(b)} |")
    print("\ncomponents (GB):")
    for key in out["sizes"]["3B"]["components_gb"]:
        print(f"  {key}: 3B {out['sizes']['3B']['components_gb'][key]}  7B {out['sizes']['7B']['components_gb'][key]}")
    for size in ("3B", "7B"):
        print(size, {k: v for k, v in out["sizes"][size]["counts"].items()})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
