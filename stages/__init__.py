"""Generation stages: one module per stage, each runnable in a plain loop and as a Ray Data actor.

Stages import `schemas` only, never ray; heavy libraries (torch, vllm, diffusers, open_clip) are imported in
`setup()` so that importing a stage is cheap.
"""
