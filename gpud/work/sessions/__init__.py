"""Sessions: the record and its state table, the manager that drives them, the worker, one task's run."""
