"""Safe model delivery: canary, shadow and blue/green through the gateway (docs/rollout.md)."""
