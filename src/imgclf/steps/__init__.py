"""Pipeline steps: one module per step, each exposing ``run(cfg, ...) -> dict`` (CONTRACTS.md)."""
