"""ASGI entry point for servers that import an app by path (uvicorn --workers, gunicorn)."""

from triage.ingest.app import create_app

app = create_app()
