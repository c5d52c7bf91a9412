"""The `hf` backend: a transformers Qwen2.5-VL model on CUDA or CPU, serving W0 + tau exactly.

All tokenisation and scoring goes through `shared.chat` (the trainer uses the same functions),
so teacher and student see identical token ids and image tensors.

Weights: `apply_delta` keeps a copy of W0 for each parameter a delta ever touched, builds the
new tensors `W0 + tau` aside (in fp32, then cast to the model dtype), and swaps the parameter
references under the model lock. A request holds that lock for its forward, so it is served
wholly by one version and reports it.

Generation samples with our own logits processor (per-item temperature, top-p and seed, vision
tokens suppressed, no hidden top-k or repetition penalty) and makes `generate` pick that token
greedily. The log-prob reported for each generated token is `log softmax(logits / T)` of it -
what `/v1/logits` with the same temperature returns (temperature 0 reports T = 1); top-p and the
vision-token suppression restrict what can be drawn but are not folded into the reported value.
"""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shared.chat import completion_logprobs, encode, encode_prompt
from shared.models import load_model_and_processor, model_fingerprint, tokenizer_fingerprint, vision_token_ids
from shared.schemas import GenerateItem, GenerateResult, LogitsItem, LogitsResult
from services.teacher.backends.base import TeacherBackend, check_finite, client_input, completion_text
from services.teacher.errors import InvalidInput, MergeRefused, NonFiniteOutput, NotReady, TooLarge

log = logging.getLogger(__name__)


def top_p_mask(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the nucleus: the smallest set of most likely tokens with mass >= top_p."""
    if top_p >= 1.0:
        return probs_V > 0
    sorted_p, idx = probs_V.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p  # mass strictly before each token
    keep_sorted = before < top_p
    keep_sorted[0] = True
    mask = torch.zeros_like(keep_sorted)
    mask[idx] = keep_sorted
    return mask


class _Sampler:
    """A logits processor that draws each row's next token itself and forces it.

    `generate(do_sample=False)` then takes our token as the argmax. Rows past their own
    `max_new_tokens` are forced to EOS so the batch can run to the longest item.
    """

    def __init__(self, items: list[GenerateItem], prompt_width: int, suppress: list[int], eos_id: int,
                 device: torch.device):
        self.items = items
        self.prompt_width = prompt_width
        self.suppress = torch.tensor(suppress, dtype=torch.long, device=device)
        self.eos_id = eos_id
        self.gens = []
        for it in items:
            g = torch.Generator(device=device)
            g.manual_seed(it.seed if it.seed is not None else random.SystemRandom().randrange(2**63))
            self.gens.append(g)
        self.logprobs: list[list[float]] = [[] for _ in items]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        logits = scores.float()
        if not bool(torch.isfinite(logits).all()):  # multinomial would fail, argmax would lie
            raise NonFiniteOutput("the model's logits are not finite: the served weights or this input overflow")
        forced = torch.full_like(logits, float("-inf"))
        for i, it in enumerate(self.items):
            if step >= it.max_new_tokens:
                tok = self.eos_id  # past this item's budget: end it (this token is dropped)
            else:
                t = it.temperature if it.temperature > 0 else 1.0
                lp = F.log_softmax(logits[i] / t, dim=-1)
                allowed = lp.clone()
                if len(self.suppress):
                    allowed[self.suppress] = float("-inf")
                if it.temperature == 0:
                    tok = int(allowed.argmax())
                else:
                    probs = allowed.softmax(-1)
                    probs = torch.where(top_p_mask(probs, it.top_p), probs, torch.zeros_like(probs))
                    tok = int(torch.multinomial(probs, 1, generator=self.gens[i]))
                self.logprobs[i].append(float(lp[tok]))
            forced[i, tok] = 0.0
        return forced


class HFBackend(TeacherBackend):
    name = "hf"
    probes_before_swap = True

    def __init__(self, model: str | Path, device: str | None = None, dtype: str | None = None,
                 max_tokens: int = 65536, loaded: tuple[Any, Any] | None = None, w0_device: str | None = None,
                 **_: Any):
        """`max_tokens`: the most padded tokens (batch x width) one request may score or generate.
        `loaded`: an already loaded (model, processor) pair (tests share one).
        `w0_device`: where the copies of the base weights W0 live. None: beside the model, and a
        merge builds the new weights aside and swaps them in (requests never wait; peak memory
        model + W0 copies + new tensors). A device (`cpu`): W0 stays there, and a merge writes
        W0 + tau into the live weights module by module, under the request lock (requests wait
        for the copy; the model's device holds no W0 copy and no second set of weights)."""
        self.model_dir = str(model)
        if loaded is None:
            loaded = load_model_and_processor(model, device=device, dtype=dtype)
        self.model, self.processor = loaded
        self.model.eval()
        self.tokenizer = self.processor.tokenizer
        self.device = next(self.model.parameters()).device
        self.max_tokens = max_tokens
        self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        self._model_fp = model_fingerprint(self.model.config)
        self._vision_ids = vision_token_ids(self.tokenizer)
        self._vocab = min(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0])
        self._eos_ids = self._eos_token_ids()
        self._neutral_generation_config()
        self._lock = threading.Lock()
        self._version = 0
        self._params = dict(self.model.named_parameters())
        self._shapes, tied = self._untied_shapes()
        if tied:
            log.info("tied parameters are not mergeable (a delta would change both uses): %s", sorted(tied))
        self._w0: dict[str, torch.Tensor] = {}
        self._w0_device = torch.device(w0_device) if w0_device else None
        self._probe_batch = self._probe_inputs()

    # ------------------------------------------------------------------ identity

    @property
    def base_model(self) -> str:
        return self.model_dir

    @property
    def tokenizer_fingerprint(self) -> str:
        return self._fingerprint

    def model_fingerprint(self) -> str | None:
        return self._model_fp

    def _untied_shapes(self) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        by_id: dict[int, list[str]] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        tied = {n for names in by_id.values() if len(names) > 1 for n in names}
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters() if n not in tied}
        return shapes, tied

    def base_parameters(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def _eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        for tok in ("<|im_end|>", "<|endoftext|>"):
            i = self.tokenizer.convert_tokens_to_ids(tok)
            if i is not None and i != self.tokenizer.unk_token_id and i not in ids:
                ids.append(i)
        return ids

    def _neutral_generation_config(self) -> None:
        """Replace the model's generation defaults with ids only.

        `generate` fills every unset option from `model.generation_config` (Qwen2.5-VL ships
        repetition_penalty 1.05, top_k 1, ...); a processor built from those would run before
        our sampler and reshape the distribution it draws from and reports.
        """
        from transformers import GenerationConfig

        old = self.model.generation_config
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else old.pad_token_id
        self.model.generation_config = GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=self._eos_ids,
                                                        pad_token_id=pad)

    @property
    def version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ weights

    def apply_delta(self, delta: dict[str, torch.Tensor] | None, version: int) -> None:
        """Serve W0 + delta as `version`. Before any request sees the new weights, a probe forward
        must give finite log-probs; otherwise the previous weights are restored and MergeRefused
        raised (the previous version keeps serving)."""
        delta = delta or {}
        unknown = [n for n in delta if n not in self._shapes]
        if unknown:
            raise InvalidInput(f"delta names parameters the model lacks: {unknown[:5]}", "bad_delta")
        for name, tau in delta.items():
            if tuple(tau.shape) != tuple(self._params[name].shape):
                raise InvalidInput(f"{name}: delta {tuple(tau.shape)} vs parameter "
                                   f"{tuple(self._params[name].shape)}", "bad_delta")
        if self._w0_device is None:
            self._swap_in(delta, version)
        else:
            self._write_in_place(delta, version)
        log.info("serving version %d (%d parameters changed from the base)", version, len(delta))

    def _swap_in(self, delta: dict[str, torch.Tensor], version: int) -> None:
        # Build the new tensors aside; requests keep running on the current weights meanwhile.
        new: dict[str, torch.Tensor] = {}
        for name, tau in delta.items():
            p = self._params[name]
            if name not in self._w0:
                self._w0[name] = p.detach().clone()
            w0 = self._w0[name]
            new[name] = (w0.float() + tau.to(device=w0.device, dtype=torch.float32)).to(w0.dtype)
        for name in self._w0:
            if name not in new:  # touched before, not now: back to W0
                new[name] = self._w0[name]
        with self._lock:
            old = {name: self._params[name].data for name in new}
            for name, t in new.items():
                self._params[name].data = t
            try:
                self._probe()
            except MergeRefused:
                for name, t in old.items():
                    self._params[name].data = t
                raise
            self._version = version

    def _write_in_place(self, delta: dict[str, torch.Tensor], version: int) -> None:
        """W0 on `w0_device`: each touched parameter becomes W0 + tau in place, one at a time, so
        the model's device holds one module's temporaries at most. Under the lock: a request sees
        the old weights or the new ones, never a mix. The previous values go to the CPU for a
        rollback until the probe has passed."""
        names = list(delta) + [n for n in self._w0 if n not in delta]
        saved: dict[str, torch.Tensor] = {}
        with self._lock:
            try:
                for name in names:
                    p = self._params[name]
                    if name not in self._w0:
                        self._w0[name] = p.detach().to(self._w0_device, copy=True)
                    saved[name] = p.detach().to("cpu", copy=True)
                    w = self._w0[name].to(p.device, torch.float32, copy=True)  # never alias W0: add_ below
                    if name in delta:
                        w.add_(delta[name].to(device=p.device, dtype=torch.float32))
                    p.data.copy_(w)
                    del w
                self._probe()
            except BaseException:
                for name, t in saved.items():
                    self._params[name].data.copy_(t)
                raise
            self._version = version

    def _probe_inputs(self):
        """A short chat with a small image and a few completion tokens: run after every merge
        (the language model and the vision tower both take part)."""
        from PIL import Image

        from shared.codecs import image_to_b64

        msgs = [{"role": "user", "content": [{"type": "image", "image": image_to_b64(Image.new("RGB", (56, 56),
                                                                                                (90, 30, 200)))},
                                             {"type": "text", "text": "probe: which action?"}]}]
        try:
            prompt = encode_prompt(self.processor, msgs)
        except Exception:  # noqa: BLE001 - a text-only model: probe with text alone
            prompt = encode_prompt(self.processor, [{"role": "user", "content": "probe: which action?"}])
        ids = self.tokenizer('{"action": "+"}', add_special_tokens=False)["input_ids"][:8] or [0]
        return encode(self.processor, [prompt], [ids], device=self.device)

    def _probe(self) -> None:
        """Raise MergeRefused unless the current weights give finite log-probs (caller holds the lock)."""
        with torch.inference_mode():
            lps, _ = completion_logprobs(self.model, self._probe_batch)
        if not bool(torch.isfinite(lps[0]).all()):
            raise MergeRefused("a probe forward under the merged weights gave non-finite log-probs")

    # ------------------------------------------------------------------ scoring

    def _prompt(self, messages) -> dict[str, torch.Tensor]:
        with client_input():
            return encode_prompt(self.processor, [m.model_dump() for m in messages])

    def _completion_ids(self, item: LogitsItem, index: int) -> list[int]:
        if item.completion_ids is not None:
            ids = list(item.completion_ids)
            bad = [t for t in ids if not 0 <= t < self._vocab]
            if bad:
                raise InvalidInput(f"item {index}: token ids {bad[:5]} are outside the vocabulary "
                                   f"(size {self._vocab})", "bad_token")
        else:
            ids = self.tokenizer(completion_text(item.completion_text, index), add_special_tokens=False)["input_ids"]
        vis = sorted(set(ids) & set(self._vision_ids))
        if vis:
            raise InvalidInput(f"item {index}: completion holds vision special tokens {vis}", "bad_token")
        return ids

    def _check_size(self, n_items: int, width: int) -> None:
        if n_items * width > self.max_tokens:
            raise TooLarge(f"request needs {n_items} x {width} = {n_items * width} padded "
                           f"tokens, more than the limit of {self.max_tokens}; split it")

    def logprobs(self, items: list[LogitsItem], temperature: float = 1.0) -> tuple[int, list[LogitsResult]]:
        comps = [self._completion_ids(it, i) for i, it in enumerate(items)]
        prompts = [self._prompt(it.messages) for it in items]
        self._check_size(len(items), max(p["input_ids"].shape[1] + len(c) for p, c in zip(prompts, comps, strict=True)))
        batch = encode(self.processor, prompts, comps, device=self.device)
        top_k = max((it.top_k or 0) for it in items)
        with self._lock, torch.inference_mode():
            version = self._version
            lps, tops = completion_logprobs(self.model, batch, temperature=temperature, top_k=top_k)
        for i, lp in enumerate(lps):
            check_finite(lp, f"item {i}: log-probs")
            if tops is not None:
                check_finite(tops[i][1], f"item {i}: top log-probs")
        results = []
        for i, (it, ids, lp) in enumerate(zip(items, comps, lps, strict=True)):
            r = LogitsResult(token_ids=ids, logprobs=lp.tolist())
            if it.top_k and tops is not None:
                top_ids, top_lp = tops[i]
                r.top_ids = top_ids[:, : it.top_k].tolist()
                r.top_logprobs = top_lp[:, : it.top_k].tolist()
            results.append(r)
        return version, results

    # ------------------------------------------------------------------ generation

    def generate(self, items: list[GenerateItem]) -> tuple[int, list[GenerateResult]]:
        from transformers import GenerationConfig, LogitsProcessorList

        prompts = [self._prompt(it.messages) for it in items]
        batch = encode(self.processor, prompts, None, device=self.device)
        longest = max(it.max_new_tokens for it in items)
        self._check_size(len(items), batch.width + longest)
        sampler = _Sampler(items, batch.width, self._vision_ids, self._eos_ids[0], self.device)
        # A fresh config: nothing from the model's generation_config.json (Qwen ships
        # repetition_penalty / top_k there) may reshape the distribution we sample from.
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=longest + 1, eos_token_id=self._eos_ids,
                                   pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                   repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)
        with self._lock, torch.inference_mode():
            version = self._version
            out = self.model.generate(**batch.inputs, generation_config=gen_cfg,
                                      logits_processor=LogitsProcessorList([sampler]))
        results = []
        for i, it in enumerate(items):
            new = out[i, batch.width:].tolist()[: it.max_new_tokens]
            lps = sampler.logprobs[i][: it.max_new_tokens]
            n = len(new)
            for j, t in enumerate(new):
                if t in self._eos_ids:
                    n = j + 1  # keep the EOS token (and its log-prob): it is what the teacher chose
                    break
            ids, lps = new[:n], lps[:n]
            check_finite(lps, f"item {i}: log-probs")
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append(GenerateResult(text=text, token_ids=ids, logprobs=lps))
        return version, results

    def check_ready(self) -> None:
        ids = torch.tensor([[self._eos_ids[0] if self._eos_ids else 0]], device=self.device)
        with self._lock, torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        if not torch.isfinite(out.logits).all():
            raise NotReady("the model's one-token forward gave non-finite logits")

    def close(self) -> None:
        self._w0.clear()
