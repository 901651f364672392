"""ctxsteer's vLLM backend: `VllmEngine` (the server side, in `engine.py`) and the `vllm.general_plugins`
entry point (`plugin.py`) that makes vLLM's own attention apply each request's steering.

Nothing here is imported unless `--engine vllm` is chosen: vLLM is an optional, separate environment.
"""
