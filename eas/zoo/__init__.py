"""In-process model recipes: tokenizers and LLaVA-family models built from configs, never downloaded."""
