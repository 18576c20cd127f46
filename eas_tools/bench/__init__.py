"""`eas bench`: baseline vs EAS latency, serving overhead, throughput, memory and FLOPs in one interleaved run.

One concept per module: `plan` (which layers a benchmark skips), `variants` (building and saving the two
models), `flops` (the analytic FLOP reference), `interleave` (A/B order), `raw` (in-process timings),
`http` (the real service on loopback), `memory` (KV-cache bytes and peak memory), `run` (the driver),
`report` (JSON, plots, summary) and `cli` (the typer command).
"""
