"""EAS core: attention skipping, PIA adapters and their exact re-parameterization on HF decoders."""

import os

# Nothing in this project may reach a model hub: fail fast instead of retrying for seconds.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
