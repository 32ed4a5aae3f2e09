"""k2c: a declarative compiler for training Kimi K2 / DeepSeek-V3 style MoE models and fine-tuning them cheaply."""

__version__ = "0.1.0"
