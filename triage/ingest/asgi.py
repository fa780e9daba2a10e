"""ASGI entry point for servers that import an app by path (uvicorn --workers, gunicorn)."""

from triage.ingest.app import create_app, log_to_stderr

log_to_stderr()
app = create_app(freeze_gc=True)
