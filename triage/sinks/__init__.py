"""Sinks: where a routed ticket's result goes besides its department queue."""
