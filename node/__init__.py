"""ringinfer node: model engine, planner, sampling, daemon and CLI."""

__version__ = "0.1.0"
