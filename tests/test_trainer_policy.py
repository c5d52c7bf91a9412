"""Policy sampling and scoring (DESIGN §4), the PPO update's mechanics, KL shaping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.trainer.config import ModelSettings, TrainConfig
from services.trainer.guidance import ReplayBuffer, SFTExample
from services.trainer.losses import gae, normalize
from services.trainer.policy import Policy
from services.trainer.ppo import PPOBatch, build_batch, ppo_update
from services.trainer.rollout import Rollout, RolloutStep
from shared.chat import encode_prompt
from shared.codecs import image_to_b64
from shared.prompting import observation_messages
from shared.schemas import Observation


def _perturb(policy: Policy, seed: int = 0) -> None:
    """Random LoRA B and value-head weights: a non-trivial adapter (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in policy.value_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    p = Policy(tiny_model_dir, ModelSettings(device="cpu", lora={"dropout": 0.0, "r": 4}), seed=0)
    _perturb(p)
    return p


@pytest.fixture(scope="module")
def prompts(policy):
    obs = [Observation(image=image_to_b64(Image.new("RGB", (200, 120), (200, 30, 30))), instruction="Reach 24.",
                       text="Current formula: 3 +"),
           Observation(instruction="You are playing number line. The target is 3 and the current position is 1."),
           Observation(image=image_to_b64(Image.new("RGB", (90, 300), (0, 90, 200))), instruction="Go.")]
    return [encode_prompt(policy.processor, observation_messages(o)) for o in obs]


LEAKY_GENERATION_CONFIG = {  # what a model directory may ship (Qwen2.5-VL-Instruct: top_k 1, top_p 0.001, ...)
    "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05, "typical_p": 0.5, "no_repeat_ngram_size": 2,
    "min_new_tokens": 4, "do_sample": False, "temperature": 0.1,
}


def test_sampler_draws_from_the_scored_distribution(tiny_model_dir, prompts, tmp_path):
    # A model directory with a generation_config.json: none of it may reach the sampler.
    import json
    import shutil

    leaky = tmp_path / "leaky"
    shutil.copytree(tiny_model_dir, leaky)
    gc = json.loads((leaky / "generation_config.json").read_text()) if (leaky / "generation_config.json").exists() else {}
    (leaky / "generation_config.json").write_text(json.dumps({**gc, **LEAKY_GENERATION_CONFIG}))
    pol = Policy(leaky, ModelSettings(device="cpu", lora={"dropout": 0.0, "r": 4}), seed=0)
    _perturb(pol)
    torch.manual_seed(0)
    comps, gen_lps = pol.generate(prompts, temperature=0.8, max_new_tokens=12, with_logprobs=True)
    with torch.no_grad():
        sc = pol.score(prompts, comps, [0] * len(comps), temperature=0.8, thought_coef=1.0)
    for a, b in zip(sc.token_logprobs, gen_lps, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a, b)
    vision = set(pol.suppress_ids)
    assert not any(set(c) & vision for c in comps)


def test_rescored_logprob_equals_stored_before_any_update(policy, prompts):
    torch.manual_seed(1)
    comps = policy.generate(prompts, temperature=1.0, max_new_tokens=10)
    n_thought = [min(3, len(comps[0])), 0, min(5, len(comps[2]))]
    with torch.no_grad():  # the rollout's scoring: whole batch, eval mode
        stored = policy.score(prompts, comps, n_thought, temperature=1.0, thought_coef=0.5)
    tok = stored.token_logprobs
    for i, nt in enumerate(n_thought):  # lambda-weighted thoughts, full-weight actions
        assert stored.logprob[i].item() == pytest.approx(0.5 * tok[i][:nt].sum().item() + tok[i][nt:].sum().item(),
                                                         abs=1e-4)
    # PPO's re-scoring: other micro-batches, other order, train mode (dropout 0): ratio 1.
    policy.train(True)
    try:
        for idx in ([2, 0], [1]):
            sc = policy.score([prompts[i] for i in idx], [comps[i] for i in idx], [n_thought[i] for i in idx],
                              temperature=1.0, thought_coef=0.5)
            ratio = torch.exp(sc.logprob.detach() - stored.logprob[idx])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio
            assert torch.allclose(sc.values.detach(), stored.values[idx], atol=1e-5)
    finally:
        policy.train(False)


def test_value_head_reads_the_last_prompt_token(policy, prompts):
    with torch.no_grad():
        alone = policy.values(prompts)
        with_completions = policy.score(prompts, [[105, 106, 107], [108], [109, 110]], [0, 0, 0], 1.0, 1.0).values
    assert torch.allclose(alone, with_completions, atol=1e-5)
    assert alone.std() > 0


def test_masked_ce_covers_only_the_first_tokens(policy, prompts):
    comps = [[11, 12, 13, 14], [15, 16, 17]]
    with torch.no_grad():
        ce = policy.masked_ce(prompts[:2], comps, [2, 3])
        sc = policy.score(prompts[:2], comps, [0, 0], 1.0, 1.0)
    want = -torch.cat([sc.token_logprobs[0][:2], sc.token_logprobs[1][:3]]).mean()
    assert ce.item() == pytest.approx(want.item(), abs=1e-5)


class _RecordingSGD(torch.optim.SGD):
    """Records the gradient norm the optimizer actually steps with."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])).item())
        return super().step(closure)


def test_grad_norm_clip_applies_and_sft_loss_is_added(tiny_model_dir, prompts):
    pol = Policy(tiny_model_dir, ModelSettings(device="cpu", lora={"dropout": 0.0, "r": 4}), seed=0)
    _perturb(pol, 3)
    torch.manual_seed(2)
    comps = pol.generate(prompts * 2, 1.0, 8)
    with torch.no_grad():
        sc = pol.score(prompts * 2, comps, [0] * 6, 1.0, 1.0)
    batch = PPOBatch(prompts=prompts * 2, completions=comps, n_thought=[0] * 6, old_logp=sc.logprob,
                     old_values=sc.values, advantages=torch.tensor([3.0, -2.0, 1.0, 2.0, -1.0, 0.5]),
                     returns=torch.tensor([5.0, -5.0, 4.0, 1.0, 2.0, 3.0]))
    cfg = TrainConfig(ppo={"minibatch_size": 4, "micro_batch_size": 2, "max_grad_norm": 1e-3, "epochs": 2},
                      guidance={"mode": "sft", "sft_batch_size": 2}, env={"num_envs": 2, "num_steps": 3})
    opt = _RecordingSGD(pol.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    buf = ReplayBuffer(4)
    buf.add(SFTExample(prompts[0], [20, 21, 22, 23], 2))
    m = ppo_update(pol, opt, sched, batch, cfg, np.random.default_rng(0), buf)
    assert m["ppo/optimizer_steps"] == 4  # 2 epochs x ceil(6 / 4) minibatches
    assert m["ppo/grad_norm"] > 1e-3  # pre-clip norm, as logged
    assert len(opt.seen) == 4 and max(opt.seen) <= 1e-3 * (1 + 1e-4)
    assert m["sft/ce"] > 0


def _step(reward, value, next_value, kl=None, terminated=False, truncated=False):
    return RolloutStep(prompt={}, messages=[], image=None, tokens=[1, 2], text="", n_thought=1, thought_ok=kl is not None,
                       logprob=-1.0, value=value, student_thought_lp=None, env_reward=reward, reward=reward,
                       terminated=terminated, truncated=truncated, format_ok=True, info={}, env_index=0,
                       next_value=next_value, kl=kl)


def test_kl_shapes_advantages_before_normalisation_and_not_returns():
    rows = [[_step(1.0, 0.5, 0.4, kl=0.2), _step(0.0, 0.1, 0.3, kl=None)],
            [_step(0.0, 0.4, 0.0, kl=1.0, terminated=True), _step(1.0, 0.3, 0.7, kl=0.5, truncated=True)]]
    rollout = Rollout(steps=rows)
    base = TrainConfig(env={"num_envs": 2, "num_steps": 2}, ppo={"gamma": 0.9, "gae_lambda": 0.8})
    kl_cfg = base.model_copy(update={"guidance": base.guidance.model_copy(update={"mode": "kl", "beta": 0.5})})
    b0, _ = build_batch(rollout, base)
    b1, m = build_batch(rollout, kl_cfg)
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.5, 0.1], [0.4, 0.3]])
    nv = torch.tensor([[0.4, 0.3], [0.0, 0.7]])
    adv, ret = gae(r, v, nv, torch.tensor([[0.0, 0], [1, 0]]), torch.tensor([[0.0, 0], [0, 1]]), 0.9, 0.8)
    kl = torch.tensor([0.2, 0.0, 1.0, 0.5])
    assert torch.allclose(b1.advantages, normalize(adv.reshape(-1) - 0.5 * kl), atol=1e-6)
    assert torch.allclose(b0.advantages, normalize(adv.reshape(-1)), atol=1e-6)
    assert torch.equal(b1.returns, b0.returns) and torch.allclose(b1.returns, ret.reshape(-1))
    assert m["ppo/kl_penalty_mean"] == pytest.approx(0.5 * kl.mean().item())


def test_adapter_roundtrip_reproduces_scores(tiny_model_dir, policy, prompts, tmp_path):
    policy.save_adapter(tmp_path / "a")
    other = Policy(tiny_model_dir, ModelSettings(device="cpu", lora={"dropout": 0.0, "r": 4}), seed=5,
                   adapter=tmp_path / "a")
    comps = [[30, 31], [32], [33, 34, 35]]
    with torch.no_grad():
        a = policy.score(prompts, comps, [1, 0, 2], 1.0, 0.5).logprob
        b = other.score(prompts, comps, [1, 0, 2], 1.0, 0.5).logprob
    assert torch.equal(a, b)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, prompts):
    grads = []
    for ckpt in (False, True):
        pol = Policy(tiny_model_dir, ModelSettings(device="cpu", gradient_checkpointing=ckpt,
                                                   lora={"dropout": 0.0, "r": 4}), seed=0)
        _perturb(pol, 4)
        pol.train(True)
        sc = pol.score(prompts, [[120, 121], [122], [123, 124, 125]], [1, 0, 2], 1.0, 0.5)
        (sc.logprob.sum() + sc.values.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in pol.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


def test_stored_prompt_gives_back_the_exact_pixels(policy):
    from services.trainer.stored_prompt import StoredPrompt, load_prompt, store_prompt
    from shared.codecs import b64_to_image, image_to_array

    arr = (np.random.default_rng(0).random((123, 211, 3)) * 255).astype(np.uint8)
    obs = Observation(image=image_to_b64(arr), instruction="Reach 24.")
    full = encode_prompt(policy.processor, observation_messages(obs))
    stored = store_prompt(full, image_to_array(b64_to_image(obs.image)))
    again = load_prompt(policy.processor, StoredPrompt.from_state(stored.state()))
    for k in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(again[k], full[k]), k
    assert stored.image.dtype == np.uint8 and "pixel_values" not in stored.state()
    text_only = encode_prompt(policy.processor, observation_messages(Observation(instruction="hi")))
    assert "pixel_values" not in load_prompt(policy.processor, store_prompt(text_only, None))
    with pytest.raises(ValueError):
        store_prompt(full, None)


def test_lora_targets_language_model_and_optionally_the_vision_tower(tiny_model_dir):
    def lora_names(vision):
        p = Policy(tiny_model_dir, ModelSettings(device="cpu", lora={"vision": vision, "target_modules": ["q_proj", "o_proj"]}))
        return [n for n, _ in p.model.named_parameters() if "lora_A" in n]

    text_only = lora_names(False)
    assert text_only and all("language_model" in n and ("q_proj" in n or "o_proj" in n) for n in text_only)
    with_vision = lora_names(True)
    assert any("visual.blocks" in n and "attn.qkv" in n for n in with_vision)
    assert set(text_only) < set(with_vision)
