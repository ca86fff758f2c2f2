"""Scorers: text in, one score per text out. Used to label training data and to judge samples."""
