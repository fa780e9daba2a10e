"""triage: a customer-support ticket triage worker."""

__version__ = "0.1.0"
