"""The pipeline: Celery app, tasks, state transitions, routing, and the outbox relay."""
