"""`gtr teacher query`: look at what the teacher thinks, token by token.

    gtr teacher query info
    gtr teacher query think --image card.png --prompt "You are playing 24 points..."
    gtr teacher query score --prompt "..." --completion '{"thoughts": "..."}' --student runs/x/model

`score` prints each completion token with the teacher's log-prob and, given a student model
directory, the student's log-prob under the same chat and the per-token KL estimate
k1 = log p_student - log p_teacher (the quantity the trainer's KL guidance averages, DESIGN §4).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path

from shared.schemas import GenerateItem, GenerateRequest, LogitsItem, LogitsRequest
from shared.teacher_client import TeacherClient


def _messages(prompt: str, image: str | None) -> list[dict]:
    content = []
    if image:
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image {path} not found")
        content.append({"type": "image", "image": base64.b64encode(path.read_bytes()).decode("ascii")})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def _student_logprobs(student_dir: str, messages: list[dict], token_ids: list[int], temperature: float,
                      teacher_fp: str) -> list[float]:
    import torch

    from shared.chat import completion_logprobs, encode, encode_prompt
    from shared.models import load_model_and_processor, tokenizer_fingerprint

    model, processor = load_model_and_processor(student_dir)
    fp = tokenizer_fingerprint(processor.tokenizer)
    if fp != teacher_fp:
        raise SystemExit(f"student tokenizer {fp} differs from the teacher's {teacher_fp}: token ids don't line up")
    batch = encode(processor, [encode_prompt(processor, messages)], [token_ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        lps, _ = completion_logprobs(model, batch, temperature=temperature)
    return lps[0].tolist()


def _token_texts(model_dir: str | None, ids: list[int]) -> list[str]:
    if not model_dir:
        return [f"#{i}" for i in ids]
    from shared.models import load_processor

    tok = load_processor(model_dir).tokenizer
    return [tok.decode([i]) for i in ids]


def run_query(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the table
    client = TeacherClient(args.url, retries=1)
    if args.query_command == "info":
        info = client.info()
        print(json.dumps(info.model_dump(mode="json"), indent=2), file=out)
        return 0
    messages = _messages(args.prompt, args.image)
    if args.query_command == "think":
        item = GenerateItem(messages=messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
        resp = client.generate(GenerateRequest(items=[item]))
        r = resp.items[0]
        if args.json:
            print(json.dumps(resp.model_dump(mode="json"), indent=2), file=out)
        else:
            mean = sum(r.logprobs) / len(r.logprobs) if r.logprobs else float("nan")
            print(f"teacher version {resp.teacher_version}, {len(r.token_ids)} tokens, mean log-prob {mean:.3f}",
                  file=out)
            print(r.text, file=out)
        return 0
    # score
    info = client.info()
    item = LogitsItem(messages=messages, completion_text=args.completion, top_k=args.top_k or None)
    resp = client.logits(LogitsRequest(items=[item], temperature=args.temperature))
    r = resp.items[0]
    if args.json:
        print(json.dumps(resp.model_dump(mode="json"), indent=2), file=out)
        return 0
    student = (_student_logprobs(args.student, messages, r.token_ids, args.temperature, info.tokenizer_fingerprint)
               if args.student else None)
    texts = _token_texts(args.tokenizer or args.student, r.token_ids)
    print(f"teacher version {resp.teacher_version} ({info.backend}, {info.base_model}), {len(r.token_ids)} tokens",
          file=out)
    header = f"{'pos':>4} {'id':>7}  {'token':<18} {'teacher':>9}"
    if student is not None:
        header += f" {'student':>9} {'kl(k1)':>8}"
    if args.top_k:
        header += f"  teacher top-{args.top_k}"
    print(header, file=out)
    kls = []
    for j, (tid, lp) in enumerate(zip(r.token_ids, r.logprobs, strict=True)):
        line = f"{j:>4} {tid:>7}  {json.dumps(texts[j])[:18]:<18} {lp:>9.4f}"
        if student is not None:
            kl = student[j] - lp
            kls.append(kl)
            line += f" {student[j]:>9.4f} {kl:>8.4f}"
        if args.top_k and r.top_ids is not None and r.top_logprobs is not None:
            line += "  " + " ".join(f"{i}:{v:.2f}" for i, v in zip(r.top_ids[j], r.top_logprobs[j], strict=True))
        print(line, file=out)
    total = sum(r.logprobs)
    summary = f"sum teacher log-prob {total:.4f}"
    if kls:
        summary += f"; mean k1 {sum(kls) / len(kls):.4f}; mean clipped k1 {sum(max(k, 0.0) for k in kls) / len(kls):.4f}"
    print(summary, file=out)
    return 0
