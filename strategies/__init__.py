"""Aggregation rules as pure torch functions over an (n_clients, n_params) update matrix."""
