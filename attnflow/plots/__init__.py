"""Figures: matplotlib is imported only inside this package."""
