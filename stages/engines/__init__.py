"""Model engines behind small interfaces: text/VLM generation (vLLM, transformers), image generation (diffusers),
image-text scoring (open_clip). Stages depend on these interfaces, not on a model or engine. No ray imports here.
"""
