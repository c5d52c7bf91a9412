"""A torchrun worker for tests/test_distributed.py: one PPO update of a recorded rollout batch,
split over the ranks exactly as the trainer splits it (rank r holds envs [r*n, (r+1)*n)).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.dist_worker \\
        --model DIR --rollout FILE --out DIR --set ppo.minibatch_size=5 ...

Rank 0 writes the adapter and value head (safetensors) and the PPO metrics (JSON) to --out.
The recorded rollout is a torch.save file this test session wrote itself (never from elsewhere).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from services.trainer.config import TrainConfig
from services.trainer.distributed import Dist, init_from_env
from services.trainer.policy import Policy
from services.trainer.ppo import build_batch, make_optimizer, ppo_update
from services.trainer.rollout import Rollout
from shared.config import build_config


def update_config(model: str, overrides: list[str]) -> TrainConfig:
    """The equivalence test's settings: no dropout (its masks depend on how samples are split),
    uneven minibatch shares (12 samples, minibatches of 5), accumulation over micro-batches of
    2, and a grad-norm clip that bites."""
    base = {"model": {"path": model, "device": "cpu", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                      "value_head_hidden": 16},
            "env": {"num_envs": 4, "num_steps": 3},
            "ppo": {"lr": 1e-4, "epochs": 2, "minibatch_size": 5, "micro_batch_size": 1, "max_grad_norm": 0.05,
                    "clip_coef": 0.2, "vf_clip": 0.2, "ent_coef": 0.0, "norm_adv": True},
            "generation": {"temperature": 1.0}}
    return build_config(TrainConfig, base, overrides)


def run_update(model: str, rollout: Rollout, dist: Dist, overrides: list[str] | None = None,
               sft_ranks: tuple[int, ...] = ()):
    """(adapter state, value-head state, PPO metrics) after one update of this rank's share.
    Ranks in `sft_ranks` hold an SFT replay buffer of one example (the rollout's first step)."""
    from services.trainer.guidance import ReplayBuffer, SFTExample

    cfg = update_config(model, overrides or [])
    first, n = dist.shard(cfg.env.num_envs, "env.num_envs")
    local = Rollout(steps=[row[first:first + n] for row in rollout.steps])
    policy = Policy(model, cfg.model, seed=0)
    sharded = policy.shard_base(dist) if cfg.model.fsdp else 0
    optimizer, scheduler = make_optimizer(policy, cfg)
    batch, _ = build_batch(local, cfg, dist=dist)
    buffer = None
    if sft_ranks:
        s0 = rollout.steps[0][0]
        buffer = ReplayBuffer(4)
        if dist.rank in sft_ranks:
            buffer.add(SFTExample(s0.prompt, list(s0.tokens), s0.n_thought))
    m = ppo_update(policy, optimizer, scheduler, batch, cfg, np.random.default_rng(7), sft_buffer=buffer, dist=dist)
    m["wrapper"] = type(policy.data_parallel(dist)).__name__
    from torch.distributed.tensor import DTensor

    m["sharded_layers"] = sharded
    m["sharded_params"] = sum(isinstance(p, DTensor) for p in policy.model.parameters())
    from peft import get_peft_model_state_dict

    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(policy.model).items()}
    head = {k: v.detach().clone() for k, v in policy.value_head.state_dict().items()}
    return adapter, head, m


def record_rollout(model_dir, path: Path) -> Path:
    """A [T=3][N=4] rollout batch recorded from the tiny policy (its own log-probs and values at
    the start weights), with rewards and episode ends drawn from a fixed generator."""
    from services.trainer.config import ModelSettings
    from services.trainer.policy import Policy
    from services.trainer.rollout import Rollout, RolloutStep
    from services.trainer.spans import split_spans
    from services.trainer.stored_prompt import store_prompt
    from shared.chat import encode_prompt
    from shared.codecs import image_to_b64

    gen = np.random.default_rng(0)
    policy = Policy(model_dir, ModelSettings(device="cpu", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                                                  value_head_hidden=16), seed=0)
    tok = policy.tokenizer
    words = ["left", "right", "target", "move", "closer", "now", "go"]
    steps = []
    for t in range(3):
        row = []
        for e in range(4):
            image = gen.integers(0, 255, size=(28, 28, 3), dtype=np.uint8) if (t + e) % 2 else None
            content = ([{"type": "image", "image": image_to_b64(image)}] if image is not None else [])
            content.append({"type": "text", "text": f"position {t + e} target {e}. answer in JSON"})
            messages = [{"role": "user", "content": content}]
            prompt = encode_prompt(policy.processor, messages)
            thought = " ".join(gen.choice(words, size=int(gen.integers(1, 5))))
            text = '{"thoughts": "%s", "action": "%s"}' % (thought, gen.choice(["+1", "-1"]))
            tokens = tok(text, add_special_tokens=False)["input_ids"]
            sp = split_spans(tok, tokens)
            with torch.no_grad():
                sc = policy.score([prompt], [tokens], [sp.n_thought], 1.0, 0.5)
            done = bool(gen.random() < 0.3)
            row.append(RolloutStep(prompt=store_prompt(prompt, image), messages=messages, image=image, tokens=tokens,
                                   text=text, n_thought=sp.n_thought, thought_ok=sp.thought_ok,
                                   logprob=float(sc.logprob[0]), value=float(sc.values[0]), student_thought_lp=None,
                                   env_reward=0.0, reward=float(gen.normal(e, 1.0 + e)), terminated=done,
                                   truncated=False, format_ok=True, info={}, env_index=e,
                                   next_value=float(gen.normal())))
        steps.append(row)
    torch.save(Rollout(steps=steps), path)
    return path


def lockstep_check(model: str, rollout: Rollout, dist: Dist) -> dict:
    """model.fsdp's lock-step forwards, each rank against an unsharded copy of the same policy in
    its own process: rank 0 stops generating early (some of its sampled tokens made end tokens),
    rank 1 has no bootstrap value to compute. Both must still finish, with the unsharded results."""
    from services.trainer.config import ModelSettings

    settings = ModelSettings(device="cpu", lora={"r": 4, "alpha": 8, "dropout": 0.0}, value_head_hidden=16)
    sharded, plain = Policy(model, settings, seed=0), Policy(model, settings, seed=0)
    assert sharded.shard_base(dist) > 0
    prompts = [s.prompt for s in rollout.steps[dist.rank]]
    torch.manual_seed(dist.rank)
    free = plain.generate(prompts, 1.0, 16)
    if dist.rank == 0:  # each completion's third token ends rank 0's outputs early (same draws, earlier stops)
        for p in (sharded, plain):
            p.eos_ids = p.eos_ids | {c[2] for c in free}
    out = {}
    for name, p in (("sharded", sharded), ("plain", plain)):
        torch.manual_seed(dist.rank)
        out[f"{name}_tokens"] = p.generate(prompts, 1.0, 16)
        with torch.no_grad():
            mine = prompts[:2] if dist.rank == 0 else []
            out[f"{name}_values"] = (p.values_together(mine, prompts[0]) if p is sharded else
                                     p.values(mine) if mine else torch.zeros(0)).tolist()
    from torch.distributed.tensor import DTensor

    # Between forwards each rank holds its shards only (FSDP swaps in the gathered tensors for a forward).
    frozen = [p for n, p in sharded.model.named_parameters() if ".layers." in n and not p.requires_grad]
    out["resharded"] = bool(frozen) and all(isinstance(p, DTensor) for p in frozen)
    # --resume loads an adapter into the sharded model: the LoRA weights (replicated) take it.
    from peft import get_peft_model_state_dict

    state = {k: v + 1.0 for k, v in get_peft_model_state_dict(plain.model).items()}
    sharded.load_adapter_state(state)
    got = get_peft_model_state_dict(sharded.model)
    out["adapter_loads"] = got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rollout", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--sft-ranks", default="", help="comma-separated ranks holding a one-example replay buffer")
    ap.add_argument("--lockstep", action="store_true", help="run lockstep_check instead; each rank writes rank{r}.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist = init_from_env("cpu", timeout_s=60)
    rollout = torch.load(args.rollout, weights_only=False)
    if args.lockstep:
        res = lockstep_check(args.model, rollout, dist)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"rank{dist.rank}.json").write_text(json.dumps(res))
        dist.close()
        return
    sft_ranks = tuple(int(r) for r in args.sft_ranks.split(",") if r)
    adapter, head, m = run_update(args.model, rollout, dist, args.set, sft_ranks)
    if dist.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter.safetensors"))
        save_file({k: v.contiguous() for k, v in head.items()}, str(out / "value_head.safetensors"))
        (out / "metrics.json").write_text(json.dumps(m))
    dist.close()


if __name__ == "__main__":
    main()
