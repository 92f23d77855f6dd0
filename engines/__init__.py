"""Networks, training, test-time adaptation, export and runtimes (numpy and torch only)."""
