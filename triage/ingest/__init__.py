"""Ingestion: where a ticket enters. app.py receives webhooks; sources/ verify and parse them."""
