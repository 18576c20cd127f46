"""The LitServe side of eas_tools/bench/peers.py, in its own module: LitServe starts its inference worker
with multiprocessing's spawn, which pickles the API object, so its class must be importable by name (and
litserve, a dev-only dependency, is imported only where this server runs). No `from __future__ import
annotations` here: LitServe reads `decode_request`'s annotation at run time to build its request body."""

import time
from pathlib import Path
from typing import Any

import litserve as ls


class PeerApi(ls.LitAPI):
    """`LoadedModel.answer` over each dynamic batch LitServe forms (with transformers' `model.generate`)."""

    def __init__(self, model_dir: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        from eas.model.loading import load_model

        # LitServe names the worker's device ("cpu", or "cuda:0" with accelerator="cuda"); bf16 on a GPU
        self.model = load_model(self.model_dir, device=device, dtype="auto")
        from eas_tools.bench.peers import peer_decode_loop

        self.model.decode_loop = peer_decode_loop()  # transformers' generate, unless --peer-loop says otherwise

    def decode_request(self, request: dict[str, Any]) -> tuple[Any, str, int]:
        from eas_tools.bench.peers import decode_body

        return decode_body(request)

    def predict(self, batch: Any) -> list[tuple[str, float, int]]:
        rows = batch if isinstance(batch, list) else [batch]  # max batch 1: LitServe passes the item itself
        start = time.perf_counter()
        answers = self.model.answer([r[0] for r in rows], [r[1] for r in rows], max(r[2] for r in rows))
        seconds = time.perf_counter() - start
        return [(answer, seconds, len(rows)) for answer in answers]

    def unbatch(self, output: list[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        answer, seconds, batch = output if isinstance(output, tuple) else output[0]
        # the model's time, as eas-serve's Server-Timing has it, and the size of the batch it ran in
        return {"answer": answer, "model_s": seconds, "batch": batch}
