"""The ``bodyage`` command line: parse options, call one library function, map errors."""
