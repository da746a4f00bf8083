"""Adaptive scheduling of speculative decoding: profile the step cost on this machine, model
it, and pick SD off or one (s, t, n) draft shape per live batch (see docs/SCHEDULER.md)."""
