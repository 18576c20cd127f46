"""Dynamic batching: per-variant bounded queues drained by one worker thread each."""
