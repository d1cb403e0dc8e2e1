"""The dbs-train application: its command line, training loop and tools around them."""
