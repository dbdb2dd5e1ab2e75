"""GPM training on cached backbone features (heads only) or end to end (full / LoRA)."""
