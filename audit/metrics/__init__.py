"""Pure metric functions and the flat metric naming scheme (no torch)."""
