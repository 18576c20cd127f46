"""Admin conversion jobs: each runs in its own worker process, supervised from the server."""
