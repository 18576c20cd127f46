"""The tools floor: the `eas` command line, the benchmarks, the demo-model recipe and the stand-alone scripts.

It sits on top of the library (`eas`), the store (`model_store`) and the service (`service`) and may import
all three; nothing below it imports it (tests/test_architecture.py). See docs/architecture.md.
"""
