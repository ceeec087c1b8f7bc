"""One module per subcommand: each reads its parsed options, checks every input before
a model loads, then does the work; each returns the exit status."""
