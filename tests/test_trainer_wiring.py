"""The wiring between the trainer's pure functions (DESIGN §4), each pinned by a test that fails
when its line breaks: how the rollout builds next_value / terminated / truncated, how
ppo_update pairs samples with advantages, accumulates micro-batches and clips the value loss,
the cosine schedule over the whole run through make_optimizer, dropout off and eval mode
restored, the KL's temperature on both sides, its unmasked student distribution, and no KL
(no teacher request) for steps without a parseable thought.

The policy is the real tiny model; the env pool is a scripted stand-in where the env service
adds nothing to the check (episode ends at chosen steps), the teacher a real HTTP fake.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from services.trainer.config import ModelSettings, TrainConfig
from services.trainer.envpool import EnvResult
from services.trainer.guidance import TeacherLink, kl_guidance, kl_temperature, make_guidance
from services.trainer.losses import ppo_clip_loss, value_loss
from services.trainer.policy import Policy
from services.trainer.ppo import PPOBatch, build_batch, make_optimizer, ppo_update
from services.trainer.rollout import collect
from services.trainer.stored_prompt import load_prompt
from shared.chat import encode, encode_prompt
from shared.prompting import observation_messages
from shared.schemas import Observation
from shared.teacher_client import TeacherClient
from fake_http import serve


def _perturb(policy: Policy, seed: int = 0, scale: float = 0.3) -> None:
    """Random LoRA B and value-head weights: a non-trivial adapter (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for p in policy.value_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _policy(model_dir, dropout: float = 0.0, seed: int = 0) -> Policy:
    p = Policy(model_dir, ModelSettings(device="cpu", lora={"dropout": dropout, "r": 4}), seed=0)
    _perturb(p, seed)
    return p


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return _policy(tiny_model_dir)


def _prompt(policy, text):
    return encode_prompt(policy.processor, observation_messages(Observation(instruction=text)))


# ------------------------------------------------------------------------------------ rollout


class ScriptedPool:
    """EnvPool's interface over a script: `ends[(env, t)]` is "terminated" or "truncated" for the
    step t of env; every observation has its own text (so its own value)."""

    def __init__(self, num_envs: int, ends: dict[tuple[int, int], str] | None = None):
        self.num_envs, self.ends, self.t = num_envs, dict(ends or {}), 0
        self.sent: list[list[str]] = []

    def open(self, seeds):
        self.t = 0
        return [EnvResult(Observation(instruction=f"env {e} starts, seed {s}.")) for e, s in enumerate(seeds)]

    def reset(self, e, seed):
        return EnvResult(Observation(instruction=f"env {e} resets at step {self.t}, seed {seed}."))

    def step(self, texts, which=None):
        self.sent.append(list(texts))
        out = []
        for e in range(self.num_envs):
            end = self.ends.get((e, self.t))
            out.append(EnvResult(Observation(instruction=f"env {e} after step {self.t}."), reward=float(e + self.t),
                                 terminated=end == "terminated", truncated=end == "truncated",
                                 info={"format_ok": True, "won": end == "terminated"}))
        self.t += 1
        return out

    def close(self):
        pass


def test_rollout_builds_next_value_terminated_and_truncated(policy):
    # env 0 terminates at step 1; env 1 hits its time limit at step 2; both still run at the end.
    cfg = TrainConfig(env={"num_envs": 2, "num_steps": 4}, generation={"max_new_tokens": 4})
    pool = ScriptedPool(2, {(0, 1): "terminated", (1, 2): "truncated"})
    rollout = collect(policy, pool, cfg, update=1)
    s = rollout.steps  # [T][N]
    assert [[x.terminated for x in row] for row in s] == [[False, False], [True, False], [False, False], [False, False]]
    assert [[x.truncated for x in row] for row in s] == [[False, False], [False, False], [False, True], [False, False]]

    def value_of(text):
        with torch.no_grad():
            return policy.values([_prompt(policy, text)]).item()

    # Inside an episode: V(s_{t+1}) is the next step's value.
    assert s[0][0].next_value == pytest.approx(s[1][0].value, abs=1e-6)
    assert s[2][0].next_value == pytest.approx(s[3][0].value, abs=1e-6)
    assert s[1][1].next_value == pytest.approx(s[2][1].value, abs=1e-6)
    # Time limit: the value of the final observation, not of the next episode's first one.
    assert s[2][1].next_value == pytest.approx(value_of("env 1 after step 2."), abs=1e-6)
    assert abs(s[2][1].next_value - s[3][1].value) > 1e-4
    # Termination: no bootstrap across the end (GAE ignores it; nothing from the next episode).
    assert s[1][0].next_value == 0.0
    # End of the rollout: the bootstrap value of the observation each env is left in.
    for e in range(2):
        assert s[3][e].next_value == pytest.approx(value_of(f"env {e} after step 3."), abs=1e-6)
    assert rollout.cut_off == 2 and len(rollout.episodes) == 2
    # What the env received is the decoded sample (the text the span split parsed).
    assert pool.sent[0] == [x.text for x in s[0]]


# ------------------------------------------------------------------------------------ PPO update


class GradRecorder(torch.optim.SGD):
    """Records the flat gradient of each step it takes (lr 0: the weights stay put)."""

    def __init__(self, params):
        self.params_list = list(params)
        super().__init__(self.params_list, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().clone()
                                     for p in self.params_list]))
        return super().step(closure)


COMPS = [[40, 41, 42, 43], [44, 45], [46, 47, 48], [49, 50, 51, 52, 53], [54], [55, 56]]
N_THOUGHT = [2, 0, 1, 3, 0, 1]


def _batch(policy, prompts, logp_offset, value_offset, advantages, returns, temperature=0.7):
    with torch.no_grad():
        sc = policy.score(prompts, COMPS, N_THOUGHT, temperature, 0.5)
    return PPOBatch(prompts=list(prompts), completions=COMPS, n_thought=N_THOUGHT,
                    old_logp=sc.logprob + torch.tensor(logp_offset), old_values=sc.values + torch.tensor(value_offset),
                    advantages=torch.tensor(advantages), returns=torch.tensor(returns))


@pytest.fixture(scope="module")
def prompts(policy):
    return [_prompt(policy, f"Observation number {i}: the target is {i % 3}.") for i in range(6)]


def test_ppo_update_steps_with_the_gradient_of_the_minibatch_loss(tiny_model_dir, prompts):
    """ppo_update's accumulated gradient over 3 micro-batches equals the gradient of the
    minibatch loss in one forward: each sample with its own advantage, old log-prob, old value
    and return; micro-batch losses weighted by their share; the value loss clipped around the
    rollout's values with its own range. Then eval mode is back."""
    pol = _policy(tiny_model_dir, seed=1)
    # Ratios off 1 (some clipped) and old values off the current ones (some value clips active).
    batch = _batch(pol, prompts, [0.3, -0.3, 0.0, 0.25, -0.1, 0.5], [1.0, -1.0, 0.05, 0.0, 0.5, -0.5],
                   [1.5, -0.5, 2.0, -1.0, 0.3, 0.8], [0.3, -2.0, 1.0, 0.4, -0.2, 0.9])
    cfg = TrainConfig(env={"num_envs": 2, "num_steps": 3}, generation={"temperature": 0.7},
                      ppo={"epochs": 1, "minibatch_size": 6, "micro_batch_size": 2, "clip_coef": 0.2, "vf_clip": 0.2,
                           "vf_coef": 0.5, "ent_coef": 0.0, "max_grad_norm": 1e9, "thought_coef": 0.5})
    opt = GradRecorder(pol.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m = ppo_update(pol, opt, sched, batch, cfg, np.random.default_rng(0))
    assert len(opt.grads) == 1 and m["ppo/optimizer_steps"] == 1
    assert not pol.value_head.training and not any(mod.training for mod in pol.model.modules())

    # The reference: the same loss over the whole minibatch in one forward, in train mode.
    for p in pol.parameters():
        p.grad = None
    pol.train(True)
    sc = pol.score(batch.prompts, batch.completions, batch.n_thought, 0.7, 0.5)
    pg, st = ppo_clip_loss(sc.logprob, batch.old_logp, batch.advantages, 0.2)
    vl = value_loss(sc.values, batch.old_values, batch.returns, 0.2)
    (pg + 0.5 * vl).backward()
    pol.train(False)
    ref = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in pol.parameters()])
    assert 0 < st["clipfrac"] < 1  # the clip matters for some samples, not all
    assert ref.abs().sum() > 0
    rel = ((opt.grads[0] - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel


def test_ppo_ratio_is_one_on_the_first_minibatch_with_lora_dropout(tiny_model_dir, prompts):
    # lora.dropout > 0 (0.05 in the paper presets): PPO scores with dropout off, like the rollout.
    pol = _policy(tiny_model_dir, dropout=0.5, seed=2)
    z = [0.0] * 6
    batch = _batch(pol, prompts, z, z, [1.0, -1.0, 0.5, 2.0, -0.3, 0.1], z)
    cfg = TrainConfig(env={"num_envs": 2, "num_steps": 3}, generation={"temperature": 0.7},
                      ppo={"epochs": 1, "minibatch_size": 6, "micro_batch_size": 3, "thought_coef": 0.5})
    opt = GradRecorder(pol.parameters())
    m = ppo_update(pol, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), batch, cfg,
                   np.random.default_rng(0))
    assert m["ppo/ratio_min"] == pytest.approx(1.0, abs=1e-5) and m["ppo/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["ppo/clipfrac"] == 0.0 and abs(m["ppo/approx_kl"]) < 1e-8


def test_cosine_schedule_spans_the_whole_run_through_make_optimizer(tiny_model_dir, prompts):
    # 3 updates x 2 epochs x ceil(6 / 4) minibatches = 12 optimizer steps in the run.
    pol = _policy(tiny_model_dir, seed=3)
    cfg = TrainConfig(updates=3, env={"num_envs": 2, "num_steps": 3}, generation={"temperature": 0.7},
                      ppo={"lr": 1e-3, "min_lr_ratio": 0.1, "epochs": 2, "minibatch_size": 4, "micro_batch_size": 2})
    assert cfg.total_optimizer_steps == 12
    opt, sched = make_optimizer(pol, cfg)
    z = [0.0] * 6
    batch = _batch(pol, prompts, z, z, [1.0, -1.0, 0.5, 2.0, -0.3, 0.1], z)
    lrs = [opt.param_groups[0]["lr"]]
    rng = np.random.default_rng(0)
    for _update in range(cfg.updates):
        ppo_update(pol, opt, sched, batch, cfg, rng, on_step=lambda: lrs.append(opt.param_groups[0]["lr"]))
    assert len(lrs) == 13
    assert lrs[0] == pytest.approx(1e-3) and lrs[6] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lrs[12] == pytest.approx(1e-4)  # the minimum exactly at the run's last step
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # never rises, never stalls


# ------------------------------------------------------------------------------------ KL guidance


ANSWERS = ['{"thoughts": "the target is right of me", "action": "+"}',  # guided
           'I am not sure.',                                              # unparseable: no KL
           'Here: {"action": "-", "thoughts": "after the action"}',       # tokens before the key, no thought
           '{"thoughts": "step back", "action": "-"}']                    # guided


def _reference_logprobs(policy, prompt, completion, temperature):
    """log softmax(logits / T) of each completion token from a plain forward of the model: the
    full vocabulary, no mask (what the teacher scores with)."""
    batch = encode(policy.processor, [load_prompt(policy.processor, prompt)], [completion], device=policy.device)
    with torch.no_grad():
        logits = policy.model(**batch.inputs, use_cache=False).logits[0].float()
    k = len(completion)
    lp = torch.log_softmax(logits[-k - 1:-1] / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


@contextmanager
def _teacher(requests: list[dict], version: int = 3):
    def handler(method, path, body):
        if path == "/v1/logits":
            requests.append(body)
            return 200, {"teacher_version": version, "items": [
                {"token_ids": it["completion_ids"], "logprobs": [-2.0] * len(it["completion_ids"])}
                for it in body["items"]]}
        if path == "/v1/teacher":
            return 200, {"version": version, "backend": "hf", "base_model": "tiny", "tokenizer_fingerprint": "fp",
                         "merge": {}, "checkpoints": 0}
        return 404, {"error": "not_found", "detail": path}

    cfg = TrainConfig(teacher={"retries": 0})
    with serve(handler) as url, TeacherClient(url, retries=0, backoff=0.01) as client:
        yield TeacherLink(cfg, client=client)


@pytest.mark.parametrize("kl_temp", ["sampling", "untempered"])
def test_kl_temperature_reaches_both_sides_and_unguided_steps_get_no_kl(policy, monkeypatch, kl_temp):
    cfg = TrainConfig(env={"num_envs": 4, "num_steps": 1}, generation={"temperature": 0.5, "max_new_tokens": 32},
                      guidance={"mode": "kl", "kl_temperature": kl_temp, "beta": 0.5})
    want_t = 0.5 if kl_temp == "sampling" else 1.0
    assert kl_temperature(cfg) == want_t == make_guidance(cfg).student_kl_temperature
    # The sampler is not under test here: scripted answers, scored for real.
    answers = [policy.tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    monkeypatch.setattr(policy, "generate", lambda prompts, *a, **k: [list(x) for x in answers])
    rollout = collect(policy, ScriptedPool(4), cfg, update=1)
    steps = rollout.flat()
    assert [s.thought_ok for s in steps] == [True, False, False, True]
    assert steps[2].n_thought > 0  # a span before the "action" key, but no "thoughts" in it: not guided
    # Student side: the thought tokens' log-probs at the KL temperature, from the unmasked distribution.
    for s, comp in zip(steps, answers, strict=True):
        ref = _reference_logprobs(policy, s.prompt, comp, want_t)[:s.n_thought]
        assert s.student_thought_lp.shape == ref.shape
        assert torch.allclose(s.student_thought_lp, ref, atol=1e-5), (s.student_thought_lp - ref).abs().max()

    requests: list[dict] = []
    with _teacher(requests) as link:
        m = kl_guidance(link, steps, cfg)
    # Teacher side: one request, at the same temperature, with the guided steps' thought tokens only.
    assert len(requests) == 1 and requests[0]["temperature"] == want_t
    assert [it["completion_ids"] for it in requests[0]["items"]] == [steps[0].tokens[:steps[0].n_thought],
                                                                      steps[3].tokens[:steps[3].n_thought]]
    assert steps[1].kl is None and steps[2].kl is None
    for s in (steps[0], steps[3]):
        want = (s.student_thought_lp + 2.0).clamp_min(0).mean().item()  # k1 = log p_s - log p_t, clipped
        assert s.kl == pytest.approx(want, abs=1e-6) and s.teacher_version == 3
    assert m["teacher/guided_frac"] == 0.5 and m["teacher/version"] == 3
    # The shaping: A' = A - beta * KL_t, KL 0 for the unguided steps.
    batch, pm = build_batch(rollout, cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"norm_adv": False})}))
    assert pm["ppo/kl_penalty_mean"] == pytest.approx(0.5 * (steps[0].kl + steps[3].kl) / 4, abs=1e-6)


def test_no_parseable_thought_no_teacher_request(policy):
    cfg = TrainConfig(env={"num_envs": 2, "num_steps": 1}, guidance={"mode": "kl"})
    tok = policy.tokenizer
    from services.trainer.rollout import RolloutStep

    def step(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        from services.trainer.spans import split_spans

        sp = split_spans(tok, ids)
        return RolloutStep(prompt=None, messages=[{"role": "user", "content": "hi"}], image=None, tokens=ids, text=text,
                           n_thought=sp.n_thought, thought_ok=sp.thought_ok, logprob=0.0, value=0.0,
                           student_thought_lp=torch.zeros(sp.n_thought), env_reward=0.0, reward=0.0, terminated=False,
                           truncated=False, format_ok=False, info={}, env_index=0)

    steps = [step(ANSWERS[1]), step(ANSWERS[2])]
    requests: list[dict] = []
    with _teacher(requests, version=5) as link:
        m = kl_guidance(link, steps, cfg)
    assert requests == [] and all(s.kl is None for s in steps)
    assert m["teacher/kl_mean"] == 0.0 and m["teacher/guided_frac"] == 0.0 and m["teacher/version"] == 5


# ------------------------------------------------------------------------------------ eval


def test_sampled_eval_is_seeded_from_its_eval_seeds(policy, monkeypatch):
    from services.trainer.evaluate import evaluate
    from tests.trainer_services import running_services

    sampled: list[list[list[int]]] = []
    generate = policy.generate

    def recording(prompts, *a, **k):
        out = generate(prompts, *a, **k)
        sampled[-1].extend(out)
        return out

    monkeypatch.setattr(policy, "generate", recording)
    reports = []
    with running_services(None, None, teacher=False) as (env_url, _):
        for global_seed in (1, 2):  # the caller's RNG state must not matter ...
            torch.manual_seed(global_seed)
            before = torch.get_rng_state()
            sampled.append([])
            reports.append(evaluate("unused", env_url, "numberline", episodes=3, greedy=False, temperature=1.0,
                                    max_new_tokens=8, max_steps=2, seed=500, num_envs=2, policy=policy))
            assert torch.equal(torch.get_rng_state(), before)  # ... and is left as it was
        sampled.append([])
        evaluate("unused", env_url, "numberline", episodes=3, greedy=False, temperature=1.0, max_new_tokens=8,
                 max_steps=2, seed=501, num_envs=2, policy=policy)
    assert sampled[0] == sampled[1] and len(sampled[0]) >= 3
    assert sampled[2] != sampled[0]  # another eval seed, other samples
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in reports]
    assert strip[0] == strip[1]


# ------------------------------------------------------------------------------------ merges


def _info(version, **kw):
    return {"version": version, "backend": "hf", "base_model": "tiny", "tokenizer_fingerprint": "fp", "merge": {},
            "checkpoints": 1, **kw}


@contextmanager
def _merging_teacher(infos: list[dict]):
    """A teacher whose /v1/teacher answers `infos` in turn (the last one from then on)."""
    polls = []

    def handler(method, path, body):
        polls.append(path)
        return 200, infos[min(len(polls), len(infos)) - 1]

    cfg = TrainConfig(teacher={"retries": 0, "await_merge_s": 30})
    with serve(handler) as url, TeacherClient(url, retries=0, backoff=0.01) as client:
        yield TeacherLink(cfg, client=client), polls


def test_the_next_update_waits_for_the_pushed_merge_and_not_for_a_failed_one():
    import time

    with _merging_teacher([_info(0, merge_running=True), _info(0, merge_running=True), _info(1)]) as (link, polls):
        link.await_pushed_merge()
        assert polls == []  # nothing pushed: nothing to wait for
        link.merge_above = 0
        link.await_pushed_merge()
        assert len(polls) == 3 and link.merge_above is None  # until version 1 was served
    with _merging_teacher([_info(0, last_merge_error="ValueError: bad adapter")]) as (link, polls):
        link.merge_above = 0
        t0 = time.monotonic()
        link.await_pushed_merge()  # the merge failed: the old version serves, no 30 s wait
        assert time.monotonic() - t0 < 10 and len(polls) == 1
