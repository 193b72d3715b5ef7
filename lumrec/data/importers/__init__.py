"""Importers that turn public data sets into the lumrec Parquet schema."""
