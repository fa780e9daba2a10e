"""Reliability: the one retry policy, dead letters, and the sweeper that recovers stuck work."""
