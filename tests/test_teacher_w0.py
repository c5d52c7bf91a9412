"""`--w0-device` (issue 15): W0 copies off the model's device, W0 + tau written module by module.

On CPU both placements run on one device, so this pins what CPU allows: the in-place path
serves bit-for-bit what the build-aside path serves, version after version, and rolls back a
refused merge exactly.
"""

from __future__ import annotations

import pytest
import torch

from shared.models import load_model_and_processor
from shared.schemas import LogitsItem
from services.teacher.backends.hf import HFBackend
from services.teacher.errors import MergeRefused
from test_teacher_service import CHATS, COMPLETIONS


def deltas(backend: HFBackend, seed: int, names: list[str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = backend.base_parameters()
    return {n: torch.randn(shapes[n], generator=g) * 0.05 for n in names}


def scores(backend: HFBackend) -> list[list[float]]:
    _, items = backend.logprobs([LogitsItem(messages=m, completion_ids=c) for m, c in zip(CHATS, COMPLETIONS,
                                                                                           strict=True)])
    return [r.logprobs for r in items]


def test_w0_on_another_device_serves_the_same_weights_and_rolls_back(tiny_model_dir):
    aside = HFBackend(tiny_model_dir, loaded=load_model_and_processor(tiny_model_dir))
    inplace = HFBackend(tiny_model_dir, loaded=load_model_and_processor(tiny_model_dir), w0_device="cpu")
    names = sorted(n for n in aside.base_parameters() if n.endswith("proj.weight"))
    assert len(names) >= 4
    base = scores(aside)
    steps = [deltas(aside, 1, names), deltas(aside, 2, names[: len(names) // 2]), None]
    for version, delta in enumerate(steps, start=1):
        aside.apply_delta(delta, version)
        inplace.apply_delta(delta, version)
        for n in names:
            assert torch.equal(aside._params[n], inplace._params[n]), (version, n)
        assert scores(inplace) == scores(aside)
    assert scores(inplace) == base  # None: back to W0 exactly
    assert all(t.device.type == "cpu" for t in inplace._w0.values())
    inplace.apply_delta(steps[0], 4)
    before = {n: inplace._params[n].detach().clone() for n in names}
    poisoned = {n: torch.full_like(t, 1e30) for n, t in deltas(aside, 3, names[:2]).items()}
    with pytest.raises(MergeRefused):
        inplace.apply_delta(poisoned, 5)
    assert inplace.version == 4
    for n in names:
        assert torch.equal(inplace._params[n], before[n]), n


def test_the_flag_reaches_the_backend(tiny_model_dir, tmp_path):
    from shared.cli import build_parser
    from services.teacher.cli import settings_from_args

    args = build_parser().parse_args(["teacher", "serve", "--model", str(tiny_model_dir), "--store",
                                      str(tmp_path), "--w0-device", "cpu", "--merge-method", "linear"])
    s = settings_from_args(args)
    assert s.w0_device == "cpu" and s.merge.method == "linear"
    assert s.backend_settings()["w0_device"] == "cpu"
