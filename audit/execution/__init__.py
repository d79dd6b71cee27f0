"""Executors run the same map/reduce locally (and, later, on Ray) with the same results."""
