"""The embedded default model: a LLaVA trained from scratch on easy-vqa, offline, on a CPU."""
