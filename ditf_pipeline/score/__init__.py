"""The score stage: PCK, J&F and homography accuracy, and the tables (no torch needed)."""
