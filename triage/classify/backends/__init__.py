"""Classification backends: Anthropic (the API), local (offline), cascade (escalation)."""
