"""Offline backdoor verification and unlearning with the curious server's reconstructions."""
