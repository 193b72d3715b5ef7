"""Data layer: schemas, partitions, importers, synthetic logs, sequences and batches."""
