"""Flower ClientApp: honest local training and the malicious behaviours."""
