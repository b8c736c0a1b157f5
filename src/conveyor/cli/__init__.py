"""The command line: parses and prints; every command calls the sdk or the engine."""
