"""Building: the parent schedules jobs within the memory budget (locally or on Ray), the worker builds one, the layout assembles the export."""
