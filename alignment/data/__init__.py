"""Data: sources -> sentences -> scores -> tags -> tokens -> batches."""
