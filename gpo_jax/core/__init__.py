"""Core model side: the decoder-only transformer and reward model, log-prob helpers, the KV-cache sampler."""
