"""Flower ServerApp: strategy from config, central security evaluation, artifacts."""
