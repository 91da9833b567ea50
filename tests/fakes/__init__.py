"""Test doubles: a fake OpenAI-compatible engine and helpers to run it behind a real Caddy."""
