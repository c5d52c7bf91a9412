"""Teacher and student score with the same fp32 head (DESIGN §4), so identical bf16 weights give
a zero KL: the "KL ~ 0 at teacher version 0" check of test_trainer_e2e, in bf16 on CPU."""

from __future__ import annotations

import torch
from PIL import Image

from shared.chat import encode_prompt
from shared.codecs import image_to_b64
from shared.schemas import LogitsItem
from services.teacher.backends.hf import HFBackend

COMPLETIONS = [[50, 100, 200, 300, 17, 23], [70, 80, 90], [400, 401, 402, 403, 404, 405, 406]]


def _chats():
    def chat(img, text):
        content = ([{"type": "image", "image": image_to_b64(img)}] if img is not None else []) + \
            [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    return [chat(Image.new("RGB", (120, 90), (0, 128, 30)), "You are playing 24 points. What next?"),
            chat(None, "go to cabinet 10 and look around the room"),
            chat(Image.new("RGB", (60, 150), (200, 10, 0)), "hi")]


def test_student_and_teacher_agree_in_bf16_at_version_0(tiny_model_dir):
    from services.trainer.config import ModelSettings
    from services.trainer.policy import Policy

    chats = _chats()
    student = Policy(tiny_model_dir, ModelSettings(device="cpu", dtype="bfloat16", lora={"dropout": 0.0, "r": 4}))
    teacher = HFBackend(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    # Scale the head so that logits are large, as in a trained model: a bf16 head rounds them
    # to ~3 significant digits (the KL floor the fp32 head removes grows with logit scale).
    with torch.no_grad():
        for m in (student.model.get_output_embeddings(), teacher.model.get_output_embeddings()):
            m.weight.mul_(8.0)
    prompts = [encode_prompt(student.processor, c) for c in chats]
    with torch.no_grad():
        s = student.score(prompts, COMPLETIONS, [len(c) for c in COMPLETIONS], temperature=1.0, thought_coef=1.0,
                          kl_temperature=1.0)
    version, t = teacher.logprobs([LogitsItem(messages=c, completion_ids=ids)
                                   for c, ids in zip(chats, COMPLETIONS, strict=True)])
    assert version == 0
    kls = []
    for lp_s, r in zip(s.thought_logprobs, t, strict=True):
        lp_t = torch.tensor(r.logprobs, dtype=torch.float32)
        kls.append((lp_s.float() - lp_t).clamp_min(0).mean().item())  # DESIGN §4: k1 clipped at 0
    # Measured: ~1e-2 with the teacher's head in bf16, 0 to float noise with the fp32 head.
    assert max(kls) < 1e-5, kls
