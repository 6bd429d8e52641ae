"""The hospital site: everything that touches patient data (slides, features, local training, DP)."""
