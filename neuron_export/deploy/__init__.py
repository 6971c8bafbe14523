"""Reading a finished export: verify, inspect, push and the instance table; never builds (never imports build/ or planning/)."""
