"""Model helpers: resolving model paths and the locally built tiny models."""
