"""Pluggable backends: one contract per family (broker, state, objects)."""
