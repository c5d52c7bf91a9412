"""The policy service (DESIGN §3.4): the rollout engine the trainer syncs its adapter into.

Not a second service implementation: it is the teacher's service code (upload, store, versions,
`/v1/generate`, auth, health, metrics) in the `latest` serving mode, which serves `W0 +` the newest
uploaded adapter exactly, with no merge and no window. With `--backend vllm` the adapter goes
into the engine through vLLM's LoRA support (`VLLMBackend.apply_adapter`).
"""
