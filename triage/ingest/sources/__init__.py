"""Webhook sources, one module each. Adding a helpdesk means adding a module and a line in
`registry.SOURCES`; nothing else changes."""
