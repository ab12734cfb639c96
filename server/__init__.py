"""vlm-server: a self-hosted, OpenAI-compatible inference server for Qwen2-VL models."""

__version__ = "0.1.0"
