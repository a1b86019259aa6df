"""A sweep's MLflow records: the writer (writer.py), the store it writes to (store.py), how the
records are read back (readers.py) and what is recorded about the machine (provenance.py)."""
