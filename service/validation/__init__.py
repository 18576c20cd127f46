"""Request validation: everything a request must pass before (and while) it is admitted to a batcher."""
