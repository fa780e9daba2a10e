"""`make bench`: triage against a bare Celery pipeline (issue 7). See bench/__main__.py."""
