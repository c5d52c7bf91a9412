"""The policy: a Qwen2.5-VL-family model with LoRA, plus a value head; sampling and scoring.

Scoring follows DESIGN §4 exactly: fp32 log-softmax of logits / T (the sampling temperature)
under the stored rollout prompt and image, thought tokens weighted by lambda, the vision
special tokens masked out on both sides (they are suppressed when sampling, so the scored
distribution is the sampled one). Rollouts run in eval mode (LoRA dropout off).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from services.trainer.config import LoraSettings, ModelSettings
from services.trainer.stored_prompt import load_prompt
from shared.chat import EncodedBatch, encode
from shared.logprobs import completion_token_stats
from shared.models import load_model, load_processor, resolve_device, vision_token_ids

log = logging.getLogger(__name__)

VISION_TARGETS = r"attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj"


def lora_config(s: LoraSettings):
    from peft import LoraConfig

    names = "|".join(s.target_modules)
    pattern = rf".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"
    if s.vision:
        pattern = rf"(?:{pattern}|.*visual\.blocks\.\d+\.(?:{VISION_TARGETS}))"
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=pattern, bias="none")


class ValueHead(nn.Module):
    """A small MLP on the last prompt token's final hidden state, in fp32 (DESIGN §4)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, inner), nn.Tanh(), nn.Linear(inner, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float()).squeeze(-1)


class TrainableForward(nn.Module):
    """The policy's trainable forward as one module (the peft model and the value head), for
    DistributedDataParallel to wrap: DDP's forward prepares its gradient reducer, so every forward
    whose loss is back-propagated under data parallelism goes through the wrapper.
    `forward(fn, *args)` runs `fn(*args)` (a closure over `Policy.score` / `Policy.masked_ce`)."""

    def __init__(self, model: nn.Module, value_head: nn.Module):
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


@dataclass
class Scores:
    logprob: torch.Tensor
    """[B] lambda * sum(thought) + sum(action) of log softmax(logits / T), fp32."""
    values: torch.Tensor
    """[B] value of each prompt."""
    entropy: torch.Tensor
    """[B] mean per-token entropy of the tempered distribution over the completion."""
    token_logprobs: list[torch.Tensor]
    """Per item, the tempered log-prob of each completion token (detached)."""
    thought_logprobs: list[torch.Tensor] | None = None
    """Per item, the log-probs of its thought tokens at the KL temperature (detached)."""


class Policy:
    def __init__(self, model_path: str | Path, settings: ModelSettings, seed: int = 0,
                 adapter: str | Path | None = None, load_device: str | None = None):
        """`load_device`: where the base is loaded, when not on `settings.device` (model.fsdp on
        CUDA loads it on the host: `shard_base` then puts 1/N of the decoder layers and the
        replicated rest on the device, so a base larger than one GPU can start)."""
        from peft import PeftModel, get_peft_model

        self.settings = settings
        self.device = resolve_device(settings.device)
        base = load_model(model_path, load_device or str(self.device), settings.dtype)
        self.processor = load_processor(model_path)
        self.tokenizer = self.processor.tokenizer
        self.suppress_ids = vision_token_ids(self.tokenizer)
        torch.manual_seed(seed)  # the LoRA and value-head init
        if adapter is not None:
            self.model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        else:
            self.model = get_peft_model(base, lora_config(settings.lora))
        text_cfg = getattr(base.config, "text_config", base.config)
        self.value_head = ValueHead(text_cfg.hidden_size, settings.value_head_hidden).to(self.device)
        if settings.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        gen = base.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self._neutral_generation_config(base)
        self._norm = next((m for n, m in self.model.named_modules() if n.endswith("language_model.norm")), None)
        if self._norm is None:
            raise RuntimeError("cannot find the language model's final norm (language_model.norm) for the value head")
        self._hidden: torch.Tensor | None = None
        self._head_w32: torch.Tensor | None = None
        self._norm.register_forward_hook(self._keep_hidden)
        self.model.eval()
        self.trainable = TrainableForward(self.model, self.value_head)
        self._data_parallel: tuple[object, nn.Module] | None = None
        self.lockstep = None
        """The Dist whose ranks must run every forward together (FSDP-sharded base), or None."""

    # ------------------------------------------------------------------ plumbing

    def _neutral_generation_config(self, base) -> None:
        """Token ids only, as the teacher's hf backend does: `generate` fills every option our
        fresh GenerationConfig leaves unset from `model.generation_config`, i.e. from the model
        directory's generation_config.json (typical_p, no_repeat_ngram_size, top_k, ...; `gtr sft`
        copies that file into its output). Any of them would make the sampled distribution differ
        from the scored one (DESIGN §6)."""
        from transformers import GenerationConfig

        old = base.generation_config
        base.generation_config = GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=sorted(self.eos_ids),
                                                  pad_token_id=self.tokenizer.pad_token_id)

    def _keep_hidden(self, _module, _inputs, output):
        self._hidden = output[0] if isinstance(output, tuple) else output

    def autocast(self):
        if self.device.type == "cuda" and self.settings.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def data_parallel(self, dist) -> nn.Module:
        """The module the PPO update runs its forwards through: `self.trainable` itself at world
        size 1, wrapped once in DistributedDataParallel under torchrun (`Dist.data_parallel`)."""
        if self._data_parallel is None or self._data_parallel[0] is not dist:
            self._data_parallel = (dist, dist.data_parallel(self.trainable))
        return self._data_parallel[1]

    def shard_base(self, dist) -> int:
        """`model.fsdp`: shard the frozen language-model decoder layers over the ranks with FSDP2's
        `fully_shard`; the LoRA parameters inside them stay whole and replicated (ignored_params),
        so DDP reduces their gradients as without sharding, and the adapter saves as usual. The
        vision tower, embeddings, head and value head stay replicated: the vision tower runs only
        for items with an image, and a sharded module must run on every rank at once. From here on
        every forward is collective (`self.lockstep`). Returns the number of sharded layers (0 at
        world size 1: nothing to shard)."""
        if not dist.active:
            self._move_unsharded_to_device()
            return 0
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist.comm_device.type, (dist.world_size,))
        layers = [m for n, m in self.model.named_modules() if re.fullmatch(r".*language_model\.layers\.\d+", n)]
        if not layers:
            raise RuntimeError("model.fsdp: cannot find the language model's decoder layers (language_model.layers.N)")
        for layer in layers:
            # Each layer is its own FSDP root, and a root keeps its weights gathered after a forward
            # unless told: resharding is what keeps 1/N of the base on each rank between forwards.
            fully_shard(layer, mesh=mesh, reshard_after_forward=True,
                        ignored_params={p for p in layer.parameters() if p.requires_grad})
        # fully_shard put each layer's shard on the mesh's device; what it does not manage (the
        # LoRA weights it ignores, the vision tower, embeddings, head) follows, when the base was
        # loaded on the host.
        self._move_unsharded_to_device()
        self.lockstep = dist
        return len(layers)

    def _move_unsharded_to_device(self) -> None:
        """Every parameter and buffer that is not an FSDP shard onto `self.device` (a no-op when
        the base was loaded there). In place, so tied weights stay tied and the optimizer, made
        after this, sees the moved parameters."""
        from torch.distributed.tensor import DTensor

        for m in self.model.modules():
            for p in m.parameters(recurse=False):
                if not isinstance(p, DTensor) and p.device != self.device:
                    p.data = p.data.to(self.device)
            for name, b in list(m.named_buffers(recurse=False)):
                if b is not None and not isinstance(b, DTensor) and b.device != self.device:
                    m._buffers[name] = b.to(self.device)

    def train(self, mode: bool = True, dropout: bool = False) -> None:
        """Train mode (gradient checkpointing runs only in train mode) with every dropout module
        off, LoRA's included, unless `dropout` (`gtr sft`'s plain CE training): PPO scores like
        the rollout did, so its ratio is exactly 1 at theta = theta_old (DESIGN §4; TRL,
        OpenRLHF and verl do the same)."""
        self.model.train(mode)
        self.value_head.train(mode)
        if mode and not dropout:
            for m in self.model.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(self.model, state)
        bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
        if bad:
            raise ValueError(f"adapter does not fit this model: unexpected keys {bad[:3]}")

    def save_adapter(self, out: str | Path) -> Path:
        """peft's save_pretrained: adapter_model.safetensors + adapter_config.json (what the teacher takes)."""
        out = Path(out)
        self.model.save_pretrained(str(out), safe_serialization=True)
        return out

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, prompts: Sequence[dict[str, torch.Tensor]], temperature: float, max_new_tokens: int,
                 greedy: bool = False, with_logprobs: bool = False):
        """Sample one completion per prompt, batched with the KV cache. The sampler draws from
        plain softmax(logits / T) minus the vision tokens: no top-k / top-p / penalties, so it is
        the distribution `score` computes (DESIGN §5.6). With `with_logprobs`, also returns the
        sampler's own log-prob of each sampled token (a check on that claim)."""
        self.model.eval()
        prompts = [load_prompt(self.processor, p) for p in prompts]
        batch = encode(self.processor, prompts, device=self.device)
        from transformers import GenerationConfig

        # A fresh config, not the model's generation_config.json (Qwen2.5-VL-Instruct ships
        # top_k 1, top_p 0.001, repetition_penalty 1.05): nothing the log-prob would not know.
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, suppress_tokens=self.suppress_ids,
                               pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids),
                               repetition_penalty=1.0, return_dict_in_generate=True, output_scores=with_logprobs,
                               use_cache=True, **kw)
        with self.autocast():
            # A sharded base: every rank runs a forward per new token until all ranks are done.
            out = self.model.generate(**batch.inputs, generation_config=gen, synced_gpus=self.lockstep is not None)
        new = out.sequences[:, batch.width:]
        completions = []
        for row in new.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row))
            completions.append(row[:cut])
        if not with_logprobs:
            return completions
        scores = torch.stack(out.scores, dim=1).float()  # processed: suppressed and divided by T
        lps = torch.log_softmax(scores, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return completions, [lps[i, :len(c)].cpu() for i, c in enumerate(completions)]

    # ------------------------------------------------------------------ scoring

    def _forward(self, prompts, completions):
        """One forward: (final hidden states at the completion-predicting positions [B,K,H],
        targets [B,K], valid mask [B,K], last-prompt hidden [B,H], batch). The head runs later,
        chunked over positions (shared.logprobs), never on all [B,K,V] at once."""
        prompts = [load_prompt(self.processor, p) for p in prompts]
        batch: EncodedBatch = encode(self.processor, prompts, completions, device=self.device)
        k = batch.completion_slice()
        self._hidden = None
        with self.autocast():
            # The model's own head runs on one position only; the completion logits are computed
            # from the final hidden states in fp32 (DESIGN §4: log-probs in fp32, which a bf16
            # head would not give on GPU).
            self.model(**batch.inputs, logits_to_keep=1, use_cache=False)
        h = self._hidden[:, batch.width - k - 1:batch.width - 1]
        targets = batch.inputs["input_ids"][:, batch.width - k:]
        lens = torch.tensor(batch.completion_lens, device=h.device)
        pos = torch.arange(k, device=h.device)
        valid = pos.unsqueeze(0) >= (k - lens).unsqueeze(1)
        last_prompt = batch.width - 1 - lens  # left padding: every row ends at the right edge
        hidden = self._hidden[torch.arange(len(prompts), device=h.device), last_prompt]
        return h, targets, valid, hidden, batch

    def _head_fp32(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        w = head.weight
        if w.dtype != torch.float32 and not w.requires_grad:
            if self._head_w32 is None or self._head_w32.device != w.device:
                self._head_w32 = w.detach().float()  # frozen: cache one fp32 copy
            w = self._head_w32
        out = torch.nn.functional.linear(h.float(), w.float())
        if getattr(head, "bias", None) is not None:
            out = out + head.bias.float()
        return out

    def score(self, prompts, completions, n_thoughts: Sequence[int], temperature: float, thought_coef: float,
              kl_temperature: float | None = None, entropy_grad: bool = True) -> Scores:
        """Log-probs, values and entropy of each (prompt, completion). Gradients flow unless
        the caller wraps it in torch.no_grad(); `entropy_grad=False` keeps the entropy (a full
        vocabulary pass) out of the graph when no entropy bonus uses it."""
        h, targets, valid, hidden, batch = self._forward(prompts, completions)
        k = targets.shape[1]
        st = completion_token_stats(h, targets, valid, self._head_fp32, temperature, self.suppress_ids,
                                    kl_temperature=kl_temperature, entropy_grad=entropy_grad,
                                    chunk=self.settings.logprob_chunk)
        tok_lp = st.logprobs_B_K
        lens = torch.tensor(batch.completion_lens, device=h.device)
        start = (k - lens).unsqueeze(1)
        pos = torch.arange(k, device=h.device).unsqueeze(0)
        thought = valid & (pos < start + torch.tensor(list(n_thoughts), device=h.device).unsqueeze(1))
        weights = valid.float() + (thought_coef - 1.0) * thought.float()
        logprob = (tok_lp * weights).sum(-1)
        entropy = (st.entropy_B_K * valid).sum(-1) / valid.sum(-1).clamp_min(1)
        values = self.value_head(hidden)
        token_lps = [tok_lp[i, k - n:].detach() for i, n in enumerate(batch.completion_lens)]
        thought_lps = None
        if kl_temperature is not None:
            # The model's own distribution, vision tokens not masked: what the teacher scores with.
            src = st.kl_logprobs_B_K
            thought_lps = [src[i, k - n:k - n + nt].detach()
                           for i, (n, nt) in enumerate(zip(batch.completion_lens, n_thoughts, strict=True))]
        return Scores(logprob, values, entropy, token_lps, thought_lps)

    def values(self, prompts) -> torch.Tensor:
        """[B] value of each prompt alone (bootstrap values of final / next observations)."""
        prompts = [load_prompt(self.processor, p) for p in prompts]
        batch = encode(self.processor, prompts, device=self.device)
        self._hidden = None
        with self.autocast():
            self.model(**batch.inputs, logits_to_keep=1, use_cache=False)
        return self.value_head(self._hidden[:, -1])

    def values_together(self, prompts, stand_in) -> torch.Tensor:
        """`values(prompts)` that every rank calls (the rollout's bootstrap values): with a sharded
        base, if any rank has prompts, a rank with none scores `stand_in` and drops the result."""
        if self.lockstep is None:
            return self.values(prompts) if prompts else torch.zeros(0)
        if not self.lockstep.any([bool(prompts)], "bootstrap value forward")[0]:
            return torch.zeros(0)
        return self.values(prompts) if prompts else self.values([stand_in])[:0]

    def masked_ce(self, prompts, completions, n_masked: Sequence[int]) -> torch.Tensor:
        """Mean cross-entropy (untempered) over the first n_masked[i] completion tokens of each
        item: the SFT loss on thought tokens (or on the whole target with n = its length)."""
        h, targets, valid, _, batch = self._forward(prompts, completions)
        k = targets.shape[1]
        lens = torch.tensor(batch.completion_lens, device=h.device)
        start = (k - lens).unsqueeze(1)
        pos = torch.arange(k, device=h.device).unsqueeze(0)
        sel = valid & (pos < start + torch.tensor(list(n_masked), device=h.device).unsqueeze(1))
        st = completion_token_stats(h, targets, sel, self._head_fp32, 1.0, self.suppress_ids, entropy=False,
                                    chunk=self.settings.logprob_chunk)
        return -(st.logprobs_B_K * sel).sum() / sel.sum().clamp_min(1)
