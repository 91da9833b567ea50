"""kimi-fleet ComponentResources: thin layers that turn a validated spec into resources."""
