"""Classification: the output schema, the prompt, and the backends that produce labels."""
