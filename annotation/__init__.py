"""Everything Argilla: dataset schema, push, collect, rankings to preference pairs, the embedded server."""
